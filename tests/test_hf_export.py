"""`export --format transformers`: the whole pondering model as a transformers model with remote
code (logits and greedy generation equal this library's, for every family and gate), the way
back (`load_checkpoint(DIR)`, the PonderLM authors' GPT-NeoX layout), and lm-eval on the exported
directory: `python -m ponder_lightning lm_eval` and lm-eval's own `hf` backend, same scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from halting import make_gates_halt
from test_pretrained import save_tiny_neox
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXModel

from ponder_lightning.cli import main
from ponder_lightning.data import load_tokenizer
from ponder_lightning.errors import UserError
from ponder_lightning.gates import BottomKGate, FixedRatioGate, SingleMLPGate
from ponder_lightning.generate import generate
from ponder_lightning.io.export import MODELING_FILE, export_transformers
from ponder_lightning.io.load import load_checkpoint
from ponder_lightning.models import AdaPonderLM, LoopTransformer, PonderLM, PonderLM2, PonderLM3, VanillaLM

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 384  # the bytes tokenizer's 257 ids padded to a multiple of 128
TINY = {"size": "tiny", "vocab_size": VOCAB}
FAMILIES = {
    "vanilla": lambda: VanillaLM(**TINY),
    "ponderlm": lambda: PonderLM(mixture_top_k=16, **TINY),
    "loop_bottom_k": lambda: LoopTransformer(gate=BottomKGate(ratio=0.3), **TINY),
    "adaponderlm": lambda: AdaPonderLM(**TINY),
    "adaponderlm_single_mlp": lambda: AdaPonderLM(gate=SingleMLPGate(), **TINY),
    "adaponderlm_fixed": lambda: AdaPonderLM(gate=FixedRatioGate(target_depth=2.5), **TINY),
    "ponderlm2": lambda: PonderLM2(**TINY),
    "ponderlm3": lambda: PonderLM3(**TINY),
}


def tiny_model(family: str):
    """A tiny model with random weights whose gates halt tokens."""
    torch.manual_seed(0)
    return make_gates_halt(FAMILIES[family]()).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, single_thread):
    """family -> (library model, exported directory)."""
    root = tmp_path_factory.mktemp("hf_export")
    return {
        f: (m := tiny_model(f), export_transformers(m, root / f, tokenizer="bytes", global_step=7)) for f in FAMILIES
    }


def padded(rows: list[list[int]], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, rows))
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for r, row in enumerate(rows):
        span = slice(longest - len(row), longest) if side == "left" else slice(0, len(row))
        ids[r, span], mask[r, span] = torch.tensor(row), 1
    return ids, mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_model_equals_the_library(exported, family):
    model, out = exported[family]
    assert (out / MODELING_FILE).is_file() and (out / "tokenizer.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert (
        config["model_type"] == "ponder_lightning"
        and config["class_path"] == f"{type(model).__module__}.{type(model).__name__}"
    )
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert not hf.training and hf.config.global_step == 7
    torch.manual_seed(1)
    ids = torch.randint(0, 257, (2, 24))
    rows = [list(range(40, 60)), list(range(70, 79))]
    left_ids, left_mask = padded(rows)
    with torch.no_grad():
        out_hf = hf(ids)
        assert (out_hf.logits - model(ids)).abs().max() <= 1e-5
        got = hf(input_ids=left_ids, attention_mask=left_mask).logits
        want = model(left_ids, left_mask.bool())
        assert (got - want)[left_mask.bool()].abs().max() <= 1e-5
        for r, row in enumerate(rows):  # padding changes nothing for the real tokens
            alone = model(torch.tensor([row]))[0]
            assert (got[r, -len(row) :] - alone).abs().max() <= 1e-5
    if family.startswith(("adaponderlm", "loop")):  # the gates halt tokens, as in the library
        assert out_hf.depth.min() < model.n_iterations
    # The way back: the exported directory loads into the same class with the same logits.
    again, data = load_checkpoint(out)
    assert type(again) is type(model) and data == {"global_step": 7, "tokenizer": "bytes"}
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


@pytest.mark.parametrize("family", ["adaponderlm", "ponderlm3"])
def test_greedy_generate_equals_ponder_lightning_generate(exported, family, capsys):
    model, out = exported[family]
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True, padding_side="left")
    prompts = ["The cat sat", "Hi"]
    ours = generate(model, prompts, tokenizer=load_tokenizer("bytes"), max_new_tokens=12)
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        theirs = hf.generate(**batch, max_new_tokens=12, do_sample=False)
    for r, tokens in enumerate(ours.tokens):
        new = theirs[r, batch["input_ids"].shape[1] :].tolist()
        assert new[: len(tokens)] == tokens
    if family == "adaponderlm":  # and the CLI prints the same continuation
        main(["generate", "--checkpoint", str(out), "--prompt", prompts[0], "--max_new_tokens", "12"])
        printed = capsys.readouterr().out
        assert prompts[0] + tok.decode(theirs[0, batch["input_ids"].shape[1] :]) in printed


def test_export_command_from_a_lightning_checkpoint(exported, tmp_path, capsys):
    model, _ = exported["adaponderlm"]
    hparams = {"_class_path": "ponder_lightning.models.AdaPonderLM", **dict(model.hparams)}
    ckpt = tmp_path / "last.ckpt"  # what `fit` writes, minus the optimizer
    torch.save(
        {
            "hyper_parameters": hparams,
            "state_dict": model.state_dict(),
            "global_step": 3,
            "datamodule_hyper_parameters": {"tokenizer": "bytes"},
        },
        ckpt,
    )
    main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--format", "transformers"])
    assert "trust_remote_code=True" in capsys.readouterr().out
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    ids = torch.randint(0, 257, (1, 16))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() <= 1e-5
    assert AutoTokenizer.from_pretrained(tmp_path / "out", trust_remote_code=True)("hé").input_ids == list(
        "hé".encode()
    )
    with pytest.raises(SystemExit) as exit_info:  # the same error handling as every command
        main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "missing.ckpt"),
                "--out",
                str(tmp_path / "x"),
                "--format",
                "transformers",
            ]
        )
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err


def authors_reference(neox: GPTNeoXModel, head: torch.nn.Linear, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """The PonderLM authors' GPT-NeoX forward, written from the paper (scale_embeds and
    mutiply_pondering_steps on): E = s * sqrt(d) * E0, then s times E += softmax(logits) @ (sqrt(d) W)."""
    scale = math.sqrt(neox.config.hidden_size)
    table = neox.embed_in.weight * scale
    embeds = neox.embed_in(ids) * scale * steps
    for _ in range(steps):
        embeds = embeds + head(neox(inputs_embeds=embeds).last_hidden_state).softmax(-1) @ table
    return head(neox(inputs_embeds=embeds).last_hidden_state)


def test_ponderlm_authors_layout_loads_as_ponderlm(tmp_path, single_thread):
    """A GPT-NeoX directory with the config fields the authors' training code sets (and their
    unused `adapter` weight) loads as a PonderLM with their settings."""
    neox = save_tiny_neox(tmp_path / "authors")
    raw = json.loads((tmp_path / "authors" / "config.json").read_text())
    raw.update(ponderinglm=True, pondering_steps=3, scale_embeds=True, mutiply_pondering_steps=True)
    (tmp_path / "authors" / "config.json").write_text(json.dumps(raw))
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tmp_path / "authors" / "model.safetensors"))
    save_file(
        {**weights, "adapter.weight": torch.zeros(64, 128)},
        str(tmp_path / "authors" / "model.safetensors"),
        metadata={"format": "pt"},
    )
    model, _ = load_checkpoint(tmp_path / "authors")
    assert type(model) is PonderLM and model.hparams.pondering_steps == 3
    assert model.hparams.scale_embeds and model.hparams.multiply_pondering_steps and model.hparams.mixture_top_k is None
    ids = torch.randint(0, 257, (2, 20))
    with torch.no_grad():
        assert (model(ids) - authors_reference(neox.gpt_neox, neox.get_output_embeddings(), ids, 3)).abs().max() <= 1e-4
    # The same directory as a start for continued pretraining: their weights and embedding scale.
    start = PonderLM(pretrained=str(tmp_path / "authors"), multiply_pondering_steps=True, **TINY).eval()
    assert start.hparams.scale_embeds
    with torch.no_grad():
        assert torch.equal(start(ids), model(ids))


@pytest.mark.parametrize("family", ["adaponderlm", "loop_bottom_k"])
def test_an_export_is_a_start_for_continued_pretraining(exported, family):
    """`--model.init_args.pretrained DIR` on a `--format transformers` export: the same class takes
    every weight (gates too) and the embedding scale it was trained with; another class takes the
    backbone and keeps its own gate."""
    original, out = exported[family]
    ids = torch.randint(0, 257, (2, 24))
    same = type(original)(
        pretrained=str(out), gate=type(original.gate)(**({"ratio": 0.3} if family == "loop_bottom_k" else {})), **TINY
    ).eval()
    assert same.hparams.scale_embeds is True  # trained from scratch with it
    with torch.no_grad():
        assert torch.equal(same(ids), original(ids))
    other = PonderLM(pretrained=str(out), **TINY)
    assert torch.equal(other.backbone.embed_in.weight, original.backbone.embed_in.weight)
    assert type(other.gate).__name__ == "AlwaysContinue"


@pytest.fixture()
def in_root(tmp_path, monkeypatch):
    import datasets

    monkeypatch.chdir(ROOT)  # the fixture tasks' data_files are relative to the repository root
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))


FIXTURES = str(ROOT / "tests" / "fixtures" / "lm_eval")


def run_lm_eval_subcommand(out: Path, results: Path) -> dict:
    main(
        [
            "lm_eval",
            "--checkpoint",
            str(out),
            "--tasks",
            "ponder_tiny",
            "--include_path",
            FIXTURES,
            "--only_include_path",
            "--bootstrap_iters",
            "0",
            "--output",
            str(results),
        ]
    )
    return json.loads(results.read_text())


def test_lm_eval_subcommand(exported, in_root, tmp_path, capsys):
    _, out = exported["adaponderlm"]
    ours = run_lm_eval_subcommand(out, tmp_path / "ours.json")
    printed = capsys.readouterr().out
    assert "ponder_tiny_choice" in printed and "FLOPs x vanilla" in printed and "mean depth" in printed
    assert 1 <= ours["compute"]["mean_depth"] < ours["compute"]["n_iterations"]  # scored at the learned depth
    assert set(ours["results"]) >= {"ponder_tiny_choice", "ponder_tiny_gen", "ponder_tiny_ppl"}
    with pytest.raises(SystemExit) as exit_info:  # a UserError: one line, status 2, as every command
        main(
            [
                "lm_eval",
                "--checkpoint",
                str(tmp_path / "missing"),
                "--tasks",
                "ponder_tiny_choice",
                "--include_path",
                FIXTURES,
            ]
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "does not exist" in err


def test_exported_dir_in_lm_eval_hf_backend_scores_as_the_adapter(exported, in_root, tmp_path):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` on the exported
    directory: every score of the local tasks equals `python -m ponder_lightning lm_eval`'s."""
    import accelerate  # noqa: F401  (lm-eval's hf backend needs it; the dev extra installs it)
    import lm_eval
    from lm_eval.tasks import TaskManager

    _, out = exported["adaponderlm"]
    ours = run_lm_eval_subcommand(out, tmp_path / "ours.json")["results"]
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={out},trust_remote_code=True,dtype=float32",
        tasks=["ponder_tiny"],
        device="cpu",
        batch_size=4,
        task_manager=TaskManager(include_path=FIXTURES, include_defaults=False),
        bootstrap_iters=0,
        log_samples=False,
    )["results"]
    checked = [
        ("ponder_tiny_choice", "acc,none"),
        ("ponder_tiny_choice", "acc_norm,none"),
        ("ponder_tiny_gen", "exact_match,none"),
        ("ponder_tiny_ppl", "word_perplexity,none"),
        ("ponder_tiny_ppl", "byte_perplexity,none"),
        ("ponder_tiny_ppl", "bits_per_byte,none"),
    ]
    for task, metric in checked:
        assert math.isclose(theirs[task][metric], ours[task][metric], rel_tol=1e-5, abs_tol=1e-6), (
            task,
            metric,
            theirs[task][metric],
            ours[task][metric],
        )


def test_loading_without_the_package_names_pip_install(exported, tmp_path, monkeypatch):
    import shutil
    import sys

    shutil.copytree(
        exported["adaponderlm"][1], tmp_path / "copy"
    )  # a new directory: transformers imports its code afresh
    for name in [k for k in sys.modules if k == "ponder_lightning" or k.startswith("ponder_lightning.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ponder_lightning", None)  # import ponder_lightning -> ImportError
    with pytest.raises(ImportError, match="pip install ponder_lightning"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "copy", trust_remote_code=True)


def test_loading_with_a_mismatched_package_names_the_version(exported, tmp_path, monkeypatch):
    """The package is installed but lacks what the export's modeling file imports (an export
    written by another version): the error says so, instead of asking to install the package."""
    import shutil
    import sys

    shutil.copytree(exported["adaponderlm"][1], tmp_path / "copy")
    monkeypatch.setitem(sys.modules, "ponder_lightning.io.load", None)  # a module this version lacks
    with pytest.raises(ImportError, match="does not match the installed ponder_lightning .*re-export"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "copy", trust_remote_code=True)


def test_exports_keep_the_runs_data_settings(tmp_path, capsys):
    """`evaluate` on an export validates on the blocks the .ckpt's run held out, for both formats."""
    import inspect

    from fit_helpers import quiet_fit_on, tiny_fit

    from ponder_lightning.data import PileDataModule

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} " * 8}) + "\n" for i in range(40)))
    main(
        [
            "fit",
            *tiny_fit("adaponderlm", seq_len=24, batch_size=2),
            *quiet_fit_on(docs, tmp_path),
            "--data.val_fraction",
            "0.25",
            "--trainer.max_steps",
            "2",
        ]
    )
    ckpt = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    want = load_checkpoint(ckpt).data
    assert want["seq_len"] == 24 and want["val_fraction"] == 0.25 and want["data_files"] == str(docs)
    accepted = inspect.signature(PileDataModule.__init__).parameters

    def val_blocks(data: dict) -> list[int]:  # what `evaluate --checkpoint` validates on
        dm = PileDataModule(**{k: v for k, v in data.items() if k in accepted})
        dm.setup("validate")
        return dm.val_dataset.stream.read(0, len(dm.val_dataset.stream)).tolist()

    for fmt in ("transformers", "backbone"):
        out = tmp_path / fmt
        main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--format", fmt])
        got = load_checkpoint(out).data
        for key in ("data_files", "val_files", "tokens", "tokenizer", "seq_len", "batch_size", "val_fraction", "seed"):
            assert got[key] == want[key], (fmt, key)
        assert got["global_step"] == want["global_step"] == 2
        assert val_blocks(got) == val_blocks(want)
        # An export of the export keeps them too.
        main(["export", "--checkpoint", str(out), "--out", str(tmp_path / f"{fmt}2"), "--format", fmt])
        assert load_checkpoint(tmp_path / f"{fmt}2").data == got
    capsys.readouterr()


def test_an_export_leaves_nothing_of_an_earlier_one_in_out(tmp_path):
    from ponder_lightning.io.export import EXPORT_MARKER, export_hf
    from ponder_lightning.io.formats import EXPORT_CONFIG, EXPORT_EXTRA_WEIGHTS

    model, out = tiny_model("adaponderlm"), tmp_path / "out"
    export_transformers(model, out, tokenizer="bytes")
    export_hf(model, out)  # the backbone format, without a tokenizer
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", EXPORT_CONFIG, EXPORT_EXTRA_WEIGHTS, EXPORT_MARKER]
    )
    again, data = load_checkpoint(out)
    assert type(again) is AdaPonderLM and "tokenizer" not in data  # no stale tokenizer read back
    export_transformers(model, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", MODELING_FILE, "generation_config.json", EXPORT_MARKER]
    )
    (out / "notes.txt").write_text("mine")  # files of others are kept
    export_hf(model, out, tokenizer="bytes")
    assert (out / "notes.txt").read_text() == "mine" and not (out / MODELING_FILE).exists()
    with pytest.raises(UserError, match="is the directory --out .* itself"):
        export_transformers(model, out, tokenizer=str(out))


@pytest.mark.parametrize("format", ["backbone", "transformers"])
def test_the_io_package_has_one_way_out_and_one_way_in(tmp_path, format, single_thread):
    import ponder_lightning.io as io

    torch.manual_seed(0)
    model = AdaPonderLM(size="tiny", vocab_size=128, pondering_steps=1).eval()
    make_gates_halt(model)
    ids = torch.randint(0, 128, (2, 12))
    out = io.export_model(model, tmp_path / format, format, tokenizer="bytes")
    loaded, data = io.load_checkpoint(out)
    assert type(loaded) is AdaPonderLM and data["tokenizer"] == "bytes"
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))  # gates included: the same depth, the same logits
    with pytest.raises(UserError, match="export format 'onnx' is unknown: use one of backbone, transformers"):
        io.export_model(model, tmp_path / "x", "onnx")


def test_a_backbone_export_is_a_start_with_the_embedding_scale_it_was_trained_with(tmp_path, single_thread):
    """`export --format backbone` (what a study's `{run:export}` writes) of a PonderLM trained from
    scratch, so with embeddings x sqrt(d): a PonderLM started from it computes what it did."""
    from ponder_lightning.io.export import export_hf

    torch.manual_seed(0)
    original = PonderLM(size="tiny", vocab_size=128, pondering_steps=1).eval()
    assert original.hparams.scale_embeds is True
    out = export_hf(original, tmp_path / "export")
    start = PonderLM(size="tiny", vocab_size=128, pondering_steps=1, pretrained=str(out)).eval()
    ids = torch.randint(0, 128, (2, 16))
    assert start.hparams.scale_embeds is True
    with torch.no_grad():
        assert torch.equal(start(ids), original(ids))
