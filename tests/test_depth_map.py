"""The depth map (`depth_map.py`, `inspect`): `pass_report` reads the training forward exactly,
for every family; the page renders in a real browser with every token coloured by its depth and
no script error; its summary is `evaluate`'s on the same blocks."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch
from fit_helpers import tiny_fit

from ponder_lightning.depth_map import PALETTE, depth_colour, pass_report, render_ansi, render_html
from ponder_lightning.gates import PerIterationMLPGate
from ponder_lightning.models import AdaPonderLM, LoopTransformer, PonderLM, PonderLM3, VanillaLM

VOCAB = 128
MODELS = {
    "adaponderlm": lambda: AdaPonderLM(
        size="tiny", vocab_size=VOCAB, gate=PerIterationMLPGate(init_bias=0.0, tau=0.45)
    ),
    "ponderlm": lambda: PonderLM(size="tiny", vocab_size=VOCAB),
    "loop": lambda: LoopTransformer(size="tiny", vocab_size=VOCAB),
    "vanilla": lambda: VanillaLM(size="tiny", vocab_size=VOCAB),
    "ponderlm3": lambda: PonderLM3(size="llama-tiny", vocab_size=VOCAB, tau=0.3),
}


def decode(token: int) -> str:
    return chr(97 + token % 26)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_report_is_the_training_forward(name, single_thread):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    ids = torch.randint(0, VOCAB, (20,))
    report = pass_report(model, ids)
    with torch.no_grad():
        hidden, trace = model.hidden_states(ids.view(1, -1))
        logits = model.backbone.logits(hidden)[0]
    assert report.depth == trace.depth()[0].tolist()
    assert torch.allclose(report.log_probs, logits.log_softmax(-1), atol=1e-5)
    assert report.targets == [*ids[1:].tolist(), None]
    own = torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="none")  # the model's prediction's NLL
    assert report.nll_as_run[-1] is None and report.nll_as_run[:-1] == pytest.approx(own.tolist(), abs=1e-5)
    for t, depth in enumerate(report.depth):
        assert report.nll[t][depth:] == [None] * (report.n_passes - depth)  # passes it did not run
        assert all(n is not None for n in report.nll[t][:depth]) or report.targets[t] is None
    if name != "ponderlm3":  # a pass's readout: the last one a token ran is the model's prediction
        last = torch.stack([report.readout_logprobs[t, d - 1] for t, d in enumerate(report.depth)])
        assert torch.allclose(last, logits.log_softmax(-1), atol=1e-5)
    if name == "adaponderlm":
        assert len(set(report.depth)) > 1  # tokens halt at different passes: the map has something to show
        assert all(n is not None for n in report.nll_full_depth[:-1])  # the last position has no target
    if name == "ponderlm3":
        assert report.unit == "latent slot" and report.n_passes == model.n_iterations
        for t in range(20):  # the router weight w_{i+1} where slot i ran, as the score of decision i
            expected = [
                float(w[0, t]) if bool(a[0, t]) else None for w, a in zip(trace.scores, trace.active, strict=False)
            ]
            assert report.scores[t] == pytest.approx(expected, abs=1e-6)
        assert len(set(report.depth)) > 1


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make install installs it where apt-get can)")
def test_the_page_renders_every_token_coloured_by_depth_with_no_script_error(tmp_path, single_thread):
    torch.manual_seed(0)
    model = MODELS["adaponderlm"]().eval()
    reports = [pass_report(model, torch.randint(0, VOCAB, (24,))) for _ in range(2)]
    page = tmp_path / "page.html"
    page.write_text(render_html(model, reports, decode, "test </script> title"))
    run = chromium(tmp_path, "--dump-dom", page.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout
    assert 'data-rendered="48"' in dom and "data-errors" not in dom
    spans = re.findall(r'<span class="tok" data-depth="(\d)"[^>]*style="background: ([^;]+);', dom)
    assert len(spans) == 48
    for depth, colour in spans:  # each span's colour is its depth's (the DOM writes it as rgb(...))
        hex_colour = "#" + "".join(f"{int(c):02x}" for c in re.findall(r"\d+", colour)) if "rgb" in colour else colour
        assert hex_colour == depth_colour(int(depth), model.n_iterations)
    assert len({depth for depth, _ in spans}) > 1  # and depth varies
    console_errors = [line for line in run.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line.upper()]
    assert not console_errors
    # a token opened from the address shows its passes: depth, and one table row per pass
    opened = chromium(tmp_path, "--dump-dom", page.as_uri() + "#token=1,3").stdout
    detail = re.search(r'<div id="detail">(.*?)</div>', opened, re.S).group(1)
    assert f"ran {reports[1].depth[3]} of 4 passes" in detail and detail.count("<tr>") == 1 + 4


def test_the_page_embeds_everything_it_shows(single_thread):
    torch.manual_seed(0)
    model = MODELS["ponderlm"]().eval()
    page = render_html(model, [pass_report(model, torch.randint(0, VOCAB, (10,)))], decode, "t")
    assert "<script src" not in page and "http" not in page  # self-contained: no network, no external script
    assert PALETTE[0] in page and PALETTE[-1] in page


def test_inspect_writes_the_page_and_its_summary_is_evaluates_on_the_same_blocks(
    tmp_path, capsys, monkeypatch, single_thread
):
    import json

    from ponder_lightning.cli import main
    from ponder_lightning.data import PileDataModule
    from ponder_lightning.evaluate import summarise, token_nll
    from ponder_lightning.gates import FullDepth
    from ponder_lightning.io.load import load_checkpoint

    spec = "synthetic:pointer_chase:symbols=6,queries=8,n_docs=300"
    main(
        ["fit", *tiny_fit("adaponderlm", seq_len=48, batch_size=4), "--data.data_files", spec]
        + ["--model.init_args.gate.init_args.init_bias", "0.0", "--model.init_args.gate.init_args.tau", "0.45"]
        + ["--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path)]
        + ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"]
    )
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    out = tmp_path / "page.html"
    main(["inspect", "--checkpoint", str(ckpt), "--blocks", "3", "--out", str(out)])
    page = out.read_text()
    data = json.loads(re.search(r"const DATA = (\{.*\});\n", page).group(1).replace("<\\/", "</"))
    model, data_args = load_checkpoint(ckpt)
    module = PileDataModule.from_recorded(data_args, val_batches=1)
    module.setup("validate")
    rows = next(iter(module.val_dataloader()))[:3]
    expected = summarise(model, *token_nll(model, [rows]), module.seq_len)
    full_nll, _ = token_nll(model, [rows], FullDepth(model.gate))
    got = data["summary"]
    assert got["tokens"] == 3 * 48
    assert got["depth_mean"] == pytest.approx(expected["depth_mean"])
    assert got["flops_x_vanilla"] == pytest.approx(expected["flops_x_vanilla"])
    assert got["nll"] == pytest.approx(expected["loss"], rel=1e-5)
    assert got["nll_full_depth"] == pytest.approx(float(full_nll.double().mean()), rel=1e-5)
    assert "Per label" in page and any(token["label"] for block in data["blocks"] for token in block)
    main(["inspect", "--checkpoint", str(ckpt), "--text", "a>b b>a |1a=b ", "--format", "ansi"])
    terminal = capsys.readouterr().out
    assert terminal.count("\x1b[48;5;") >= len("a>b b>a |1a=b ") and "mean depth" in terminal
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # with no --out, the page goes beside the checkpoint
    main(["inspect", "--checkpoint", str(ckpt), "--text", "a>b b>a |1a=b "])
    assert (ckpt.parent / "last_depth_map.html").is_file() and not any((tmp_path / "cwd").iterdir())


def test_render_ansi_colours_each_token(single_thread):
    torch.manual_seed(0)
    model = MODELS["loop"]().eval()
    report = pass_report(model, torch.randint(0, VOCAB, (12,)))
    text = render_ansi(model, [report], decode)
    assert text.splitlines()[1].count("\x1b[48;5;") == 12


def test_the_opt_in_callback_writes_the_depth_map_to_tensorboard(tmp_path, single_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ponder_lightning.cli import run_lightning_cli

    run_lightning_cli(
        ["fit", *tiny_fit("ponderlm"), "--trainer.callbacks+=ponder_lightning.callbacks.DepthMapMonitor"]
        + ["--trainer.callbacks.blocks", "1", "--trainer.default_root_dir", str(tmp_path)]
        + ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"]
        + ["--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false"]
    )
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"))
    events.Reload()
    assert "val/depth_map" in events.Tags()["images"]
