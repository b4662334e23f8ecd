"""The synthetic pointer-chase task (data/synthetic.py): documents follow their own table, the
labels say what each token takes (checked here by an independent parse), blocks cut anywhere
label only what they can, and the task trains through `fit` like any data."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from fit_helpers import ROOT, tiny_fit

from ponder_lightning.cli import run_lightning_cli
from ponder_lightning.data import PileDataModule
from ponder_lightning.data.synthetic import (
    ALEATORIC,
    FORMAT,
    STEPS,
    UNKNOWN,
    Compose,
    PointerChase,
    label_block,
    label_text,
    target_labels,
)
from ponder_lightning.errors import UserError


def independent_answers(doc: str) -> list[tuple[int, int]]:
    """(position of each answer, hops), with every answer checked by following the table here."""
    table_text, queries = doc.split("|")
    table = dict(pair.split(">") for pair in table_text.split())
    out = []
    for match in re.finditer(r"(\d)([a-z])=([a-z]) ", queries):
        node = match.group(2)
        for _ in range(int(match.group(1))):
            node = table[node]
        assert node == match.group(3), match.group(0)
        out.append((len(table_text) + 1 + match.start(3), int(match.group(1))))
    return out


def test_documents_follow_their_tables_and_every_token_is_labelled():
    task = PointerChase(symbols=6, max_hops=4, queries=40, n_docs=50, seed=3)
    hops = Counter()
    for doc in task.documents_text():
        labels = label_text(doc)
        answers = independent_answers(doc)
        assert UNKNOWN not in labels and len(answers) == 40
        assert {i for i, label in enumerate(labels) if label > ALEATORIC} == {i for i, _ in answers}
        assert all(labels[i] == STEPS + k for i, k in answers)
        assert labels[doc.index("|")] == FORMAT and labels[doc.index(">")] == FORMAT
        hops.update(k for _, k in answers)
    assert set(hops) == {1, 2, 3, 4} and min(hops.values()) > 0.2 * sum(hops.values()) / 4


def test_same_seed_same_documents_another_seed_others():
    a, b = PointerChase(n_docs=5, seed=1), PointerChase(n_docs=5, seed=2)
    assert list(a.documents_text()) == list(PointerChase(n_docs=5, seed=1).documents_text())
    assert list(a.documents_text()) != list(b.documents_text())


def test_a_block_cut_inside_a_table_labels_no_answer_it_cannot_check():
    doc = next(PointerChase(symbols=8, queries=6, n_docs=1).documents_text())
    cut = doc[9:]  # the table without its first pairs
    labels = label_text(cut)
    assert not any(label > ALEATORIC for label in labels)  # answers need the whole table
    assert labels[cut.index("|") + 1] == ALEATORIC  # the queries' hop counts are still random


def test_shuffled_tables_are_labelled_when_a_documents_end_precedes_them():
    task = PointerChase(symbols=6, max_hops=3, queries=20, n_docs=30, seed=2, shuffle=1)
    docs = list(task.documents_text())
    assert docs != list(PointerChase(symbols=6, max_hops=3, queries=20, n_docs=30, seed=2).documents_text())
    assert any(doc[0] != "a" for doc in docs)  # the keys do come in another order
    stream = "".join("\x00" + doc for doc in docs)
    labels, at = label_text(stream), 1
    for doc in docs:
        mine = labels[at : at + len(doc)]
        answers = independent_answers(doc)  # each follows the table read independently
        assert {i for i, label in enumerate(mine) if label > ALEATORIC} == {i for i, _ in answers}
        assert all(mine[i] == STEPS + k for i, k in answers)
        keys = range(0, doc.index("|"), 4)
        expected = FORMAT if "".join(doc[i] for i in keys) == "abcdef" else ALEATORIC
        assert all(mine[i] == expected for i in keys) and UNKNOWN not in mine
        at += len(doc) + 1
    # The first document of a block has no EOS before it: its table may be cut, so it labels
    # no answer; a table cut anywhere else labels none either.
    unsorted = next(doc for doc in docs if doc[0] != "a")
    assert not any(label > ALEATORIC for label in label_text(unsorted))
    cut = label_text("\x00" + docs[1][4:])
    assert not any(label > ALEATORIC for label in cut)
    # Cut to pairs that look sorted: not a permutation, so its queries are not labelled (nor refused).
    assert not any(label > ALEATORIC for label in label_text("c a>d b>f |2b=e 1e=c 1f=e "))
    # Cut to a closed part of its permutation that looks sorted: right for queries that start in it.
    labels = label_text("c a>b b>a |2a=a 1e=c 1b=a ")
    assert [labels[i] for i in (14, 19, 24)] == [STEPS + 2, UNKNOWN, STEPS + 1]


def test_a_text_whose_answer_does_not_follow_its_table_is_refused():
    with pytest.raises(ValueError, match="does not follow"):
        label_text("a>b b>a |1a=a ")


def independent_compositions(doc: str) -> list[tuple[int, int]]:
    """(position of each answer, functions applied) of a compose document, each answer checked
    by applying the tables parsed here."""
    tables_text, queries = doc.split("|")
    tables = {}
    for block in tables_text.rstrip(";").split(";"):
        name, body = block.split(":")
        tables[name] = {pair[0]: pair[1] for pair in body.split()}
    out = []
    for match in re.finditer(r"([A-Z]+)([a-z])=([a-z]) ", queries):
        node = match.group(2)
        for name in match.group(1):
            node = tables[name][node]
        assert node == match.group(3), match.group(0)
        out.append((len(tables_text) + 1 + match.start(3), len(match.group(1))))
    return out


def test_compose_documents_follow_their_tables_and_every_token_is_labelled():
    task = Compose(symbols=5, functions=3, max_steps=4, queries=30, n_docs=40, seed=4)
    steps = Counter()
    for doc in task.documents_text():
        labels = label_text(doc)
        answers = independent_compositions(doc)
        assert UNKNOWN not in labels and len(answers) == 30
        assert {i for i, label in enumerate(labels) if label > ALEATORIC} == {i for i, _ in answers}
        assert all(labels[i] == STEPS + k for i, k in answers)
        assert labels[doc.index("|")] == FORMAT and labels[doc.index(":")] == FORMAT
        steps.update(k for _, k in answers)
    assert set(steps) == {1, 2, 3, 4} and min(steps.values()) > 0.2 * sum(steps.values()) / 4


def test_a_compose_block_cut_inside_a_table_labels_only_answers_it_can_check():
    docs = list(Compose(symbols=4, functions=2, max_steps=2, queries=12, n_docs=2, seed=1).documents_text())
    second = docs[1]
    cut = docs[0][5:] + "\x00" + second  # the first document's table A without its first pair
    labels = label_text(cut)
    for i, name_and_chain in ((m.start(3), m.group(1)) for m in re.finditer(r"([A-Z]+)([a-z])=([a-z]) ", cut)):
        in_first = i < len(docs[0]) - 5
        if in_first and "A" in name_and_chain:
            assert labels[i] == UNKNOWN  # needs the cut table
        else:
            assert labels[i] == STEPS + len(name_and_chain)
    with pytest.raises(ValueError, match="does not follow"):
        label_text("A:ab ba;|Aa=a ")


@pytest.mark.parametrize(
    "spec",
    [
        "synthetic:addition",
        "synthetic:pointer_chase:hops=3",
        "synthetic:pointer_chase:symbols=40",
        "synthetic:pointer_chase:shuffle=2",
    ],
)
def test_bad_synthetic_specs_are_named(spec):
    with pytest.raises(UserError, match="pointer_chase"):
        PileDataModule(data_files=spec, tokenizer="bytes")._streams()


def test_the_task_trains_through_fit_and_its_blocks_are_labelled(tmp_path, single_thread):
    spec = "synthetic:pointer_chase:symbols=6,queries=8,n_docs=400"
    cli = run_lightning_cli(
        ["fit", *tiny_fit("vanilla", seq_len=64, batch_size=4), "--data.data_files", spec]
        + ["--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path)]
        + ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]
    )
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    block = next(iter(cli.datamodule.val_dataloader()))[0].tolist()
    labels = label_block(block)[1:]  # the targets' labels
    assert len(labels) == 64 and any(label > ALEATORIC for label in labels) and FORMAT in labels


def test_label_report_counts_each_label_and_auroc_reads_depth(tmp_path, single_thread):
    """On a fixed-ratio AdaPonderLM (depth drawn independently of the labels) the per-label rows
    agree with the per-token results, and AUROC equals the rank statistic computed here."""
    from ponder_lightning.evaluate import label_report, token_nll
    from ponder_lightning.gates import FixedRatioGate, NoPonderLoss
    from ponder_lightning.models import AdaPonderLM

    model = AdaPonderLM(
        size="tiny",
        tokenizer_vocab_size=257,
        gate=FixedRatioGate(target_depth=2.0, schedule="geometric"),
        regularizer=NoPonderLoss(),
    )
    docs = list(PointerChase(symbols=6, queries=8, n_docs=8, seed=5).documents_text())
    ids = [[256, *map(ord, doc)] for doc in docs]
    length = min(map(len, ids))
    batch = torch.tensor([row[:length] for row in ids])
    labels = torch.tensor([label_block(row)[1:] for row in batch.tolist()])
    report = label_report(model, [batch], [labels], context=batch.shape[1] - 1)
    nll, depth = token_nll(model, [batch])
    flat = labels.flatten()
    for value, name in [(FORMAT, "format"), (ALEATORIC, "aleatoric"), (STEPS + 2, "k=2")]:
        row = report["labels"][name]
        assert row["tokens"] == int((flat == value).sum())
        assert row["nll"] == pytest.approx(float(nll[flat == value].double().mean()), rel=1e-6)
        assert row["depth_mean"] == pytest.approx(float(depth[flat == value].double().mean()))
    multi, single = depth[flat > STEPS + 1].double(), depth[flat == STEPS + 1].double()
    assert len(torch.cat([multi, single]).unique()) > 1  # depth varies, so the AUROC is not 0.5 by ties alone
    pairs = (multi[:, None] > single[None, :]).double() + 0.5 * (multi[:, None] == single[None, :]).double()
    assert report["auroc_depth_multi_step"] == pytest.approx(float(pairs.mean()), abs=1e-6)


def test_evaluate_reports_each_label_of_a_synthetic_run(tmp_path, capsys, monkeypatch, single_thread):
    import json

    from ponder_lightning.research.cli import main

    spec = "synthetic:pointer_chase:symbols=6,queries=8,n_docs=400"
    main(
        ["fit", *tiny_fit("adaponderlm", seq_len=64, batch_size=4), "--data.data_files", spec]
        + ["--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path)]
        + ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"]
    )
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # with no --out, the evaluation goes beside the checkpoint
    main(["evaluate", "--checkpoint", str(ckpt), "--batches", "2"])
    assert not any((tmp_path / "cwd").iterdir())
    study = json.loads((ckpt.parent / "last_evaluation" / "labels.json").read_text())
    assert set(study) == {"as_trained", "full_depth", "oracle_depth", "readout_at_need"}
    report = study["as_trained"]
    assert {"format", "aleatoric", "k=1"} <= set(report["labels"]) and "AUROC of depth" in capsys.readouterr().out
    assert sum(row["tokens"] for row in report["labels"].values()) <= 2 * 4 * 64
    assert study["oracle_depth"]["labels"]["format"]["depth_mean"] == 1.0


def test_validation_logs_each_labels_depth_and_the_auroc_that_evaluate_computes(tmp_path, capsys, single_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ponder_lightning.evaluate import label_report
    from ponder_lightning.io.load import load_checkpoint

    spec = "synthetic:pointer_chase:symbols=6,queries=8,n_docs=400"
    cli = run_lightning_cli(
        ["fit", *tiny_fit("adaponderlm", seq_len=64, batch_size=4), "--data.data_files", spec]
        + ["--config", str(ROOT / "configs" / "gates" / "fixed_geometric.yaml")]
        + ["--model.init_args.gate.init_args.target_depth", "2.0"]
        + ["--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path)]
        + ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2"]
        + ["--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false"]
    )
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"))
    events.Reload()
    logged = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    model, _ = load_checkpoint(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    batches = list(cli.datamodule.val_dataloader())[:2]
    report = label_report(model, batches, [target_labels(b) for b in batches], context=64)
    assert logged["val/auroc_depth_multi_step"] == pytest.approx(report["auroc_depth_multi_step"], abs=1e-5)
    for name, row in report["labels"].items():
        assert logged[f"val/label_depth/{name}"] == pytest.approx(row["depth_mean"], abs=1e-5), name
        assert logged[f"val/label_nll/{name}"] == pytest.approx(row["nll"], rel=1e-4), name
    summary = capsys.readouterr().out  # the fit summary names them too
    nll, depth = map(float, re.search(r"k=1 ([\d.]+) / ([\d.]+)", summary).groups())
    assert nll == pytest.approx(report["labels"]["k=1"]["nll"], abs=2e-3)
    assert depth == pytest.approx(report["labels"]["k=1"]["depth_mean"], abs=1e-2)
    auroc = float(re.search(r"AUROC of depth, k >= 2 vs k = 1 tokens: ([\d.]+)", summary).group(1))
    assert auroc == pytest.approx(report["auroc_depth_multi_step"], abs=2e-3)


def test_the_paired_bootstrap_keeps_each_blocks_pair_together():
    from ponder_lightning.evaluate import paired_bootstrap

    generator = torch.Generator().manual_seed(0)
    hits = torch.randint(0, 5, (40,), generator=generator)
    same = [[[int(h), 5] for h in hits]]
    assert paired_bootstrap(same, same) == (0.0, 0.0, 0.0)  # identical sides: every resample differs by 0
    better = [[[min(int(h) + 1, 5), 5] for h in hits]]  # one more right in most blocks
    point, low, high = paired_bootstrap(better, same)
    exact = (sum(min(int(h) + 1, 5) for h in hits) - int(hits.sum())) / 200
    assert point == pytest.approx(exact) and 0 < low < point < high
    unpaired_spread = float(hits.double().std() / 5 / 40**0.5)  # the spread an unpaired comparison would see
    assert high - low < 2 * unpaired_spread  # pairing removes the blocks' own spread
    with pytest.raises(ValueError, match="same blocks"):
        paired_bootstrap(same, [same[0][:-1]])


def test_each_decisions_score_auroc_reads_the_scores_of_the_tokens_active_at_it(single_thread):
    from torchmetrics.functional.classification import binary_auroc

    from ponder_lightning.evaluate import label_report
    from ponder_lightning.gates import PerIterationMLPGate
    from ponder_lightning.models import AdaPonderLM

    torch.manual_seed(0)
    model = AdaPonderLM(size="tiny", tokenizer_vocab_size=257, gate=PerIterationMLPGate(init_bias=0.0, tau=0.45))
    docs = list(PointerChase(symbols=6, queries=8, n_docs=8, seed=5).documents_text())
    ids = [[256, *map(ord, doc)] for doc in docs]
    batch = torch.tensor([row[: min(map(len, ids))] for row in ids])
    labels = torch.tensor([label_block(row)[1:] for row in batch.tolist()])
    report = label_report(model, [batch], [labels], context=batch.shape[1] - 1)
    with torch.no_grad():
        _, trace = model.hidden_states(batch[:, :-1])
    assert len(report["auroc_score_multi_step"]) == model.n_iterations - 1
    checked = 0
    for i, value in enumerate(report["auroc_score_multi_step"]):
        at = (labels > STEPS) & trace.active[i]
        multi = labels[at] > STEPS + 1
        if not (multi.any() and (~multi).any()):
            assert value is None  # no pair of classes to rank at this decision
            continue
        expected = binary_auroc(trace.scores[i][at].double(), multi.long())
        assert value == pytest.approx(float(expected), abs=1e-6)
        checked += 1
    assert checked >= 1
