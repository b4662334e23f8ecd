"""The command line as a user runs it: LightningCLI fit/validate, overrides, clear errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fit_helpers import tiny_fit
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ponder_lightning.cli import run_lightning_cli
from ponder_lightning.research.cli import main

ROOT = Path(__file__).resolve().parents[1]


def fit(tmp_path: Path, *extra: str, config: str = "vanilla") -> None:
    main(["fit", *tiny_fit(config, seq_len=64, batch_size=4), "--trainer.default_root_dir", str(tmp_path), *extra])


def scalars(logdir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def fast_dev_run(tmp_path: Path, *extra: str, config: str = "vanilla") -> None:
    """Two training steps through the CLI: both ran, and the last loss is finite."""
    cli = run_lightning_cli(
        ["fit", *tiny_fit(config, seq_len=64, batch_size=4), "--trainer.default_root_dir", str(tmp_path), *extra]
        + ["--trainer.fast_dev_run", "2"]
    )
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("config", ["vanilla", "ponderlm", "loop", "adaponderlm"])
def test_every_config_fits_with_fast_dev_run(tmp_path, config):
    fast_dev_run(tmp_path, config=config)


def test_short_run_learns_and_logs_to_tensorboard(tmp_path):
    fit(
        tmp_path,
        "--trainer.max_steps",
        "60",
        "--trainer.val_check_interval",
        "20",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.log_every_n_steps",
        "5",
        "--model.init_args.lr",
        "3e-3",
        "--peak_tflops",
        "0.001",  # MFU against a 1 GFLOP/s chip
    )
    version = tmp_path / "lightning_logs" / "version_0"
    logged = scalars(version)
    for tag in ("train/loss", "train/lr", "val/loss", "val/ppl", "train/device/items_per_sec", "train/device/mfu"):
        assert tag in logged, f"{tag} missing from TensorBoard; have {sorted(logged)}"
    assert logged["train/device/mfu"][-1] == pytest.approx(logged["train/device/flops_per_sec"][-1] / 1e9)
    val = logged["val/loss"]
    assert len(val) == 3 and val[-1] < val[1] < val[0] - 0.1, val
    assert (version / "checkpoints" / "last.ckpt").is_file()
    assert (version / "config.yaml").is_file()


def test_print_config_shows_resolved_yaml_with_overrides(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / "adaponderlm.yaml"),
                "--model.init_args.lr",
                "0.0042",
                "--data.seq_len",
                "96",
                "--print_config",
            ]
        )
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: ponder_lightning.models.AdaPonderLM" in out
    assert "lr: 0.0042" in out and "seq_len: 96" in out
    assert "class_path: ponder_lightning.gates.PerIterationMLPGate" in out


def test_gate_overlay_swaps_the_gate(capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / "adaponderlm.yaml"),
                "--config",
                str(ROOT / "configs" / "gates" / "single_mlp.yaml"),
                "--print_config",
            ]
        )
    out = capsys.readouterr().out
    assert "ponder_lightning.gates.SingleMLPGate" in out and "PerIterationMLPGate" not in out


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ponder_lightning", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_unknown_config_field_is_a_clear_error(tmp_path):
    result = run_cli(
        "fit",
        "--config",
        str(ROOT / "configs" / "vanilla.yaml"),
        "--model.init_args.learning_rate",
        "1e-3",
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "learning_rate" in result.stderr


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["--data.data_files", "does/not/exist.jsonl"], "does/not/exist.jsonl"),
        (["--model.init_args.size", "pythia-15m"], "pythia-15m"),
        (
            ["--data.seq_len", "4096", "--model.init_args.size", "pythia-14m", "--data.tokenizer", "bytes"],
            "max_seq_len",
        ),
        (["--data.tokenizer", "neox", "--model.init_args.vocab_size", "1024"], "vocab_size"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, args, culprit):
    result = run_cli(
        "fit",
        "--config",
        str(ROOT / "configs" / "vanilla.yaml"),
        "--trainer.fast_dev_run",
        "1",
        "--trainer.default_root_dir",
        str(tmp_path),
        *args,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and culprit in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_pile_jsonl_files_train_with_no_other_change(tmp_path):
    docs = tmp_path / "pile"
    docs.mkdir()
    records = [
        {
            "text": f"Document number {i}. " + "The quick brown fox jumps over the lazy dog. " * 20,
            "meta": {"pile_set_name": "Pile-CC"},
        }
        for i in range(40)
    ]
    (docs / "00.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    fast_dev_run(tmp_path, "--data.data_files", str(docs / "*.jsonl"))


def test_generate_and_flops_commands_on_a_trained_checkpoint(tmp_path):
    fit(
        tmp_path,
        "--trainer.max_steps",
        "6",
        "--trainer.val_check_interval",
        "3",
        "--trainer.limit_val_batches",
        "1",
        "--model.init_args.gate_start_step",
        "2",
        "--trainer.log_every_n_steps",
        "2",
        "--trainer.callbacks+=ponder_lightning.callbacks.DifficultyMonitor",
        config="adaponderlm",
    )
    version = tmp_path / "lightning_logs" / "version_0"
    events = EventAccumulator(str(version))
    events.Reload()
    tags = events.Tags()
    for tag in (
        "train/depth_mean",
        "train/halted_fraction",
        "train/flops_x_vanilla",
        "train/active_fraction/iter_3",
        "val/flops_x_vanilla",
        "val/depth_mean",
    ):
        assert tag in tags["scalars"], tag
    assert {"gate/scores_iter_0", "gate/scores_iter_2", "depth/tokens"} <= set(tags["histograms"])
    assert "val/depth_vs_nll" in tags["images"]
    for tag in (
        "val/ppl_full_depth",
        "val/ppl_first_pass",
        "val/depth_spearman/nll_full_depth",
        "train/gate/weak_continuing_fraction/iter_0",
        "train/gate/halted_fraction/iter_2",
    ):
        assert tag in tags["scalars"], tag
    ckpt = version / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    result = run_cli(
        "generate",
        "--checkpoint",
        str(ckpt),
        "--prompt",
        "def f(x):",
        "--prompt",
        "A",
        "--max_new_tokens",
        "5",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("--- prompt:") == 2
    assert result.stdout.count("depth per generated token:") == 2
    assert (
        "tokens/s" in result.stdout
        and "backbone passes" in result.stdout
        and "x vanilla FLOPs per token" in result.stdout
    )
    compiled = run_cli(
        "generate", "--checkpoint", str(ckpt), "--prompt", "def f(x):", "--prompt", "A", "--max_new_tokens", "5",
        "--compile_attention", cwd=tmp_path,
    )  # fmt: skip
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    texts = [re.split(r"\n--- \d+ tokens", out.stdout)[0] for out in (result, compiled)]
    assert texts[0] == texts[1] and "depth per generated token" in texts[0]  # same tokens and depths

    from ponder_lightning.io.load import load_checkpoint

    model, data_args = load_checkpoint(ckpt)
    assert type(model).__name__ == "AdaPonderLM" and type(model.gate).__name__ == "PerIterationMLPGate"
    assert data_args["tokenizer"] == "bytes" and model.gate_active  # trained past gate_start_step

    evaluation = run_cli(
        "evaluate",
        "--checkpoint",
        str(ckpt),
        "--tau",
        "1e-4,0.5",
        "--batches",
        "1",
        "--out",
        str(tmp_path / "eval"),
        cwd=tmp_path,
    )
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert "| 0.0001 |" in evaluation.stdout and "| 0.5 |" in evaluation.stdout
    assert (tmp_path / "eval" / "quality_vs_compute.png").is_file()
    # The controls come with every evaluation of a gated model.
    assert (
        "controls on the same weights and data:" in evaluation.stdout
        and "| full depth (no halting) |" in evaluation.stdout
    )
    assert "random pruning, learned profile (seed 0)" in evaluation.stdout and "| nll_first_pass |" in evaluation.stdout
    assert {"rows", "difficulty", "tokens"} <= set(json.loads((tmp_path / "eval" / "gate_study.json").read_text()))

    table = run_cli(
        "flops", "--config", str(ROOT / "configs" / "ponderlm.yaml"), "--active", "1,0.5,0.5,0.25", cwd=tmp_path
    )
    assert table.returncode == 0, table.stderr[-3000:]
    rows = [line for line in table.stdout.splitlines() if line.startswith("| 1")]
    assert len(rows) == 2 and "| 4.000 |" in rows[0] and "| 2.250 |" in rows[1]


def test_generate_rejects_missing_checkpoint(tmp_path):
    result = run_cli("generate", "--checkpoint", "nope.ckpt", "--prompt", "x", cwd=tmp_path)
    assert result.returncode == 2 and "nope.ckpt" in result.stderr and "Traceback" not in result.stderr


def test_step_bar_flops_summary_and_kept_checkpoints(tmp_path):
    """What a user sees of a run: a `Step n/max_steps` bar (not `Epoch 0/-2`, nor `10/5` after a
    resume), the summary's analytic training FLOPs (not `Total FLOPs: 0`), `--checkpoint_every N`
    saving every N steps, and the configs keeping the newest 3 periodic checkpoints by step next to
    last.ckpt and last_good.ckpt, all loadable."""
    from ponder_lightning.callbacks import FlopsModelSummary
    from ponder_lightning.io.load import load_checkpoint
    from ponder_lightning.models import VanillaLM

    args = [
        "fit",
        *tiny_fit("vanilla"),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    first = run_cli(*args, "--trainer.max_steps", "6", "--checkpoint_every", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    shown = " ".join((first.stdout + first.stderr).split())  # a narrow terminal may wrap lines
    assert re.search(r"\bStep\b[^A-Za-z]*\b6/6\b", shown) and "Epoch" not in shown, shown[-2000:]
    flops = (
        3 * VanillaLM(size="tiny", tokenizer_vocab_size=257).full_depth_flops_per_token(32) * 32 * 2
    )  # fwd+bwd, 2 rows of 32
    assert f"{FlopsModelSummary.FLOPS_LABEL}: {flops:.3g}" in shown and "Total FLOPs" not in shown, shown[-2000:]

    def kept(version: int) -> dict[str, int]:
        files = sorted((tmp_path / "lightning_logs" / f"version_{version}" / "checkpoints").iterdir())
        return {p.name: load_checkpoint(p).data["global_step"] for p in files}  # every one loads

    assert kept(0) == {
        "epoch=0-step=4.ckpt": 4,
        "epoch=0-step=5.ckpt": 5,
        "epoch=0-step=6.ckpt": 6,
        "last.ckpt": 6,
        "last_good.ckpt": 5,
    }

    resumed = run_cli(
        *args, "--trainer.max_steps", "10", "--checkpoint_every", "2", "--ckpt_path", "last", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    shown = " ".join((resumed.stdout + resumed.stderr).split())
    assert re.search(r"\bStep\b[^A-Za-z]*\b10/10\b", shown) and "Epoch" not in shown, shown[-2000:]
    periodic = {name: step for name, step in kept(1).items() if not name.startswith("last")}
    assert periodic == {"epoch=0-step=8.ckpt": 8, "epoch=0-step=10.ckpt": 10}  # every 2nd step from the resumed step 6


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: python -m ponder_lightning COMMAND")
    for command in ("fit", "validate", "flops", "generate", "evaluate", "study", "prepare", "export", "lm_eval"):
        assert re.search(rf"^  {command} +\S", printed, re.M), command  # each with its one line
    with pytest.raises(SystemExit) as exit_info:
        main(["evalute"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown command 'evalute'") and "lm_eval" in err and "\n" not in err
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert capsys.readouterr().out.startswith("usage: python -m ponder_lightning")  # not __main__.py


def test_a_configured_gate_health_monitor_replaces_the_default_one(tmp_path):
    from ponder_lightning.callbacks import GateHealthMonitor

    cli = run_lightning_cli(
        ["fit", *tiny_fit("adaponderlm", seq_len=64, batch_size=4), "--trainer.default_root_dir", str(tmp_path)]
        + ["--trainer.callbacks+=ponder_lightning.callbacks.GateHealthMonitor"]
        + ["--trainer.callbacks.one_pass_depth=1.0", "--trainer.fast_dev_run", "1"]
    )
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, GateHealthMonitor)]
    assert [m.one_pass_depth for m in monitors] == [1.0]
    default = run_lightning_cli(
        ["fit", *tiny_fit("adaponderlm", seq_len=64, batch_size=4), "--trainer.default_root_dir", str(tmp_path)]
        + ["--trainer.fast_dev_run", "1"]
    )
    assert [m.one_pass_depth for m in default.trainer.callbacks if isinstance(m, GateHealthMonitor)] == [1.05]
