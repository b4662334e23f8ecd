"""The lm-evaluation-harness adapter: its scores equal our own scoring, and a local task runs
end to end through `lm_eval.simple_evaluate` with the compute report next to the scores."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from halting import make_gates_halt
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from ponder_lightning.data import load_tokenizer  # noqa: E402
from ponder_lightning.errors import UserError  # noqa: E402
from ponder_lightning.generate import generate  # noqa: E402
from ponder_lightning.io.export import export_hf  # noqa: E402
from ponder_lightning.io.load import load_checkpoint  # noqa: E402
from ponder_lightning.lm_eval_adapter import PonderLightningLM, format_compute_report, main  # noqa: E402
from ponder_lightning.models import AdaPonderLM, PonderLM2  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "lm_eval"
EOS = 256  # the bytes tokenizer's


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, single_thread):
    """A tiny AdaPonderLM whose gates halt some tokens (random weights), exported with the bytes
    tokenizer recorded, as `load_checkpoint` (and so the adapter) reads it."""
    torch.manual_seed(0)
    model = make_gates_halt(AdaPonderLM(size="tiny", vocab_size=384))
    return export_hf(model, tmp_path_factory.mktemp("lm_eval") / "model", tokenizer="bytes")


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_checkpoint(checkpoint).model


def requests(kind, *args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@torch.no_grad()
def own_score(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Sum of log-softmax of model(ids) at the continuation positions, and whether argmax = it."""
    ids = torch.tensor([context + continuation])
    logprobs = F.log_softmax(model(ids[:, :-1]).float(), dim=-1)[0, -len(continuation) :]
    target = torch.tensor(continuation)
    return float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def greedy_pair(model) -> tuple[str, str]:
    """A context whose greedy next byte is ASCII, with that byte as the continuation."""
    for n in range(40):
        context = f"Sample {n}:"
        with torch.no_grad():
            token = int(model(torch.tensor([list(context.encode())]))[0, -1].argmax())
        if token < 128:
            return context, chr(token)
    raise AssertionError("no context with an ASCII greedy byte")


def test_loglikelihood_equals_own_scoring(checkpoint, model):
    lm = PonderLightningLM(checkpoint=str(checkpoint), batch_size=3)
    greedy_context, greedy_byte = greedy_pair(model)
    pairs = [
        ("Question: What colour is the sky?\nAnswer:", " blue"),
        ("The cat", " sat on the mat"),
        ("Hello ", "world"),  # trailing space moves to the continuation
        ("", "hello"),  # empty context: conditioned on EOS
        (greedy_context, greedy_byte),
    ]
    got = lm.loglikelihood(requests("loglikelihood", *pairs))
    expected = [
        own_score(model, list(b"Question: What colour is the sky?\nAnswer:"), list(b" blue")),
        own_score(model, list(b"The cat"), list(b" sat on the mat")),
        own_score(model, list(b"Hello"), list(b" world")),
        own_score(model, [EOS], list(b"hello")),
        own_score(model, list(greedy_context.encode()), list(greedy_byte.encode())),
    ]
    for (logprob, greedy), (want, want_greedy) in zip(got, expected, strict=True):
        assert abs(logprob - want) < 1e-5, (logprob, want)
        assert greedy == want_greedy
    assert got[-1][1] is True and got[0][1] is False

    # Left truncation: the input keeps the last max_length tokens.
    short = PonderLightningLM(checkpoint=str(checkpoint), max_length=16)
    context, continuation = "a rather long context of many bytes,", " then this"
    ((logprob, _),) = short.loglikelihood(requests("loglikelihood", (context, continuation)))
    ids = list(context.encode()) + list(continuation.encode())
    want, _ = own_score(model, ids[-17 : -len(continuation)], list(continuation.encode()))
    assert abs(logprob - want) < 1e-5

    report = lm.compute_report()
    # Every input token counts: context + continuation less its last byte, plus EOS for the empty context.
    assert report["tokens"] == sum(len(c.encode()) + len(x.encode()) - 1 for c, x in pairs) + 1
    assert 1 <= report["mean_depth"] <= model.n_iterations and report["flops_x_vanilla"] > 0
    assert math.isclose(report["mean_depth"], sum(report["active_fractions"]), rel_tol=1e-9)


def test_loglikelihood_rolling_is_the_sum_over_the_text(checkpoint, model):
    text = "Perplexity counts every byte of this sentence, once."
    tokens = list(text.encode())
    stream = [EOS] + tokens
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([stream[:-1]])).float(), -1)[0]
    want = float(logprobs.gather(-1, torch.tensor(tokens)[:, None]).sum())
    lm = PonderLightningLM(checkpoint=str(checkpoint))
    (got,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (text,)))
    assert abs(got - want) < 1e-5

    # Longer than max_length: disjoint windows, each token predicted once with the most context
    # the window allows (lm_eval's documented scheme).
    length = 16
    want = 0.0
    for start in range(0, len(tokens), length):
        end = min(start + length, len(tokens))
        inputs = stream[max(0, end - length) : end]
        with torch.no_grad():
            logprobs = F.log_softmax(model(torch.tensor([inputs])).float(), -1)[0, -(end - start) :]
        want += float(logprobs.gather(-1, torch.tensor(tokens[start:end])[:, None]).sum())
    windowed = PonderLightningLM(checkpoint=str(checkpoint), max_length=length, batch_size=2)
    (got,) = windowed.loglikelihood_rolling(requests("loglikelihood_rolling", (text,)))
    assert abs(got - want) < 1e-5
    assert windowed.compute_report()["by_request_type"]["loglikelihood_rolling"]["tokens"] >= len(tokens)


def test_generate_until_cuts_at_stop_strings(checkpoint, model):
    tokenizer = load_tokenizer("bytes")
    prompts = ["Question: Which animal barks?\nAnswer:", "Hi"]
    free = generate(model, prompts, tokenizer=tokenizer, max_new_tokens=12).texts
    stop = free[0][len(free[0]) // 2]  # a character the greedy continuation does produce
    lm = PonderLightningLM(checkpoint=str(checkpoint), batch_size=2)
    got = lm.generate_until(requests("generate_until", *[(p, {"until": [stop], "max_gen_toks": 12}) for p in prompts]))
    for text, full in zip(got, free, strict=True):
        assert text == full.split("<|endoftext|>")[0].split(stop)[0]
        assert stop not in text
    generated = lm.compute_report()["by_request_type"]["generate_until"]
    assert generated["tokens"] >= 1 and generated["mean_depth"] >= 1


def test_local_task_end_to_end(checkpoint, tmp_path, monkeypatch):
    """Three local tasks (multiple choice, generation, rolling perplexity) from the fixture
    directory: offline, built-in metrics only, the model created from a model_args string."""
    import datasets

    monkeypatch.chdir(ROOT)  # the fixture's data_files are relative to the repository root
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    task_manager = TaskManager(include_path=str(FIXTURES), include_defaults=False)
    results = lm_eval.simple_evaluate(
        model="ponder_lightning",
        model_args=f"checkpoint={checkpoint},batch_size=4",
        tasks=["ponder_tiny"],
        task_manager=task_manager,
        bootstrap_iters=0,
        log_samples=False,
    )
    scores = results["results"]
    assert 0.0 <= scores["ponder_tiny_choice"]["acc,none"] <= 1.0
    assert 0.0 <= scores["ponder_tiny_gen"]["exact_match,none"] <= 1.0
    assert math.isfinite(scores["ponder_tiny_ppl"]["bits_per_byte,none"])
    compute = results["config"]["ponder_lightning"]["compute"]
    assert compute["mean_depth"] >= 1 and compute["flops_x_vanilla"] > 0
    assert set(compute["by_request_type"]) == {"loglikelihood", "loglikelihood_rolling", "generate_until"}
    assert "mean depth" in format_compute_report(compute)


def test_cli_prints_scores_and_compute(checkpoint, tmp_path, monkeypatch, capsys):
    import datasets

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    out = tmp_path / "results.json"
    main(
        [
            "--checkpoint",
            str(checkpoint),
            "--tasks",
            "ponder_tiny_choice",
            "--include_path",
            str(FIXTURES),
            "--only_include_path",
            "--limit",
            "2",
            "--bootstrap_iters",
            "0",
            "--output",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "ponder_tiny_choice" in printed and "acc" in printed and "FLOPs x vanilla" in printed
    saved = json.loads(out.read_text())
    assert saved["compute"]["tokens"] > 0 and "acc,none" in saved["results"]["ponder_tiny_choice"]


def test_latent_models_score_and_report_without_a_gate(tmp_path):
    """PonderLM-2/3 have no token gate: the adapter scores them and reports tau as None; a tau
    argument is refused with a message naming the model."""
    torch.manual_seed(0)
    latent = export_hf(PonderLM2(size="tiny", vocab_size=384), tmp_path / "latent", tokenizer="bytes")
    lm = PonderLightningLM(checkpoint=str(latent))
    context, continuation = "Sample 1:", "x"
    ((logprob, _),) = lm.loglikelihood(requests("loglikelihood", (context, continuation)))
    expected, _ = own_score(lm.model, list(context.encode()), list(continuation.encode()))
    assert logprob == pytest.approx(expected, abs=1e-4)
    report = lm.compute_report()
    assert report["model"] == "PonderLM2" and report["tau"] is None
    with pytest.raises(Exception, match="PonderLM2 has no gate with a halting threshold"):
        PonderLightningLM(checkpoint=str(latent), tau=0.5)


@pytest.mark.parametrize(
    "flag, value", [("--limit", "ten"), ("--limit", "2.5"), ("--limit", "0"), ("--tau", "7"), ("--batch_size", "0")]
)
def test_cli_flags_are_checked_before_loading(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", "x.ckpt", "--tasks", "ponder_tiny", flag, value])
    assert exit_info.value.code == 2
    assert f"error: argument {flag}:" in capsys.readouterr().err


def test_unknown_task_and_tau_are_one_clear_error(checkpoint, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ["--checkpoint", "x.ckpt", "--include_path", str(FIXTURES), "--only_include_path"]
    with pytest.raises(UserError, match="--tasks: no task or group named bogus_task in"):  # was a KeyError
        main([*args, "--tasks", "ponder_tiny,bogus_task"])
    with pytest.raises(UserError, match="tau=7 is out of range"):
        PonderLightningLM(checkpoint=str(checkpoint), tau=7)


def test_max_length_defaults_to_the_trained_seq_len(checkpoint, tmp_path):
    """A Lightning checkpoint records the blocks it was trained on: positions beyond them are
    untrained, so scoring windows default to that length (an export records none: max_seq_len)."""
    model = load_checkpoint(checkpoint).model
    assert PonderLightningLM(checkpoint=str(checkpoint)).max_length == model.config.max_seq_len
    ckpt = tmp_path / "last.ckpt"
    torch.save(
        {
            "hyper_parameters": {
                "_class_path": "ponder_lightning.models.AdaPonderLM",
                "size": "tiny",
                "vocab_size": 384,
            },
            "state_dict": model.state_dict(),
            "datamodule_hyper_parameters": {"tokenizer": "bytes", "seq_len": 64},
            "global_step": 0,
        },
        ckpt,
    )
    assert PonderLightningLM(checkpoint=str(ckpt)).max_length == 64
    assert PonderLightningLM(checkpoint=str(ckpt), max_length=128).max_length == 128
