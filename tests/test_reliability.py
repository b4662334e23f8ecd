"""What the library promises when things go wrong (docs/reliability.md): opening a checkpoint runs
no code, an export never deletes or replaces the user's files, every output path is checked before
the work, SIGTERM saves and exits 143 (one process and 2-process DDP), Ctrl-C in `generate` keeps
what was generated."""

from __future__ import annotations

import os
import pickle
import re
import stat
from pathlib import Path

import pytest
import torch
from fit_helpers import tiny_fit, trainer_overlay
from scaleout_helpers import ROOT, logged_steps, read_losses, run_fit

import ponder_lightning.generate as generate_module
from ponder_lightning.errors import UserError
from ponder_lightning.io.load import load_checkpoint
from ponder_lightning.io.safe import UnsafeCheckpoint
from ponder_lightning.research.cli import main

pytestmark = pytest.mark.timeout(300)
QUIET = ["--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"]
QUIET += ["--trainer.enable_model_summary", "false"]


class _RunsCode:
    """Unpickling this creates `path`: what a hostile checkpoint would do with os.system."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def hostile_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """(a .ckpt whose pickle creates a file when opened, that file's path)."""
    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "hostile.ckpt"
    torch.save({"hyper_parameters": {"_class_path": "ponder_lightning.models.VanillaLM", "x": _RunsCode(marker)}}, ckpt)
    return ckpt, marker


def one_error_line(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith(("error:", "python -m ponder_lightning")), lines
    return lines[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, single_thread) -> Path:
    """A two-step tiny AdaPonderLM run (bytes tokenizer): its last.ckpt."""
    root = tmp_path_factory.mktemp("trained")
    main(
        ["fit", *tiny_fit("adaponderlm"), *QUIET, "--trainer.max_steps", "2", "--data.cache_dir", str(root / "cache")]
        + ["--trainer.default_root_dir", str(root)]
    )
    return root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


# -- loading runs no code ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--prompt", "a", "--checkpoint"],
        ["evaluate", "--out", "{tmp}/evaluation", "--checkpoint"],
        ["export", "--out", "{tmp}/out", "--checkpoint"],
        ["lm_eval", "--tasks", "x", "--checkpoint"],
        ["validate", *tiny_fit("vanilla"), "--ckpt_path"],
        ["fit", *tiny_fit("vanilla"), "--ckpt_path"],
    ],
    ids=lambda c: c[0],
)
def test_a_checkpoint_that_runs_code_is_refused_without_running_it(capsys, tmp_path, command):
    ckpt, marker = hostile_checkpoint(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in command] + [str(ckpt)]
    if command[0] == "lm_eval":
        pytest.importorskip("lm_eval")
        argv += ["--include_path", str(ROOT / "tests" / "fixtures" / "lm_eval"), "--only_include_path"]
        argv[2] = "ponder_tiny_choice"
    line = one_error_line(capsys, argv)
    assert not marker.exists()
    assert "could run code" in line and "--trust_checkpoint" in line and "io.open" in line, line


def test_a_sharded_checkpoint_whose_metadata_runs_code_is_refused(capsys, tmp_path):
    marker = tmp_path / "code_ran"
    shards = tmp_path / "last.ckpt"
    shards.mkdir()
    (shards / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    torch.save({"hyper_parameters": {}}, shards / "meta.pt")
    with pytest.raises(UnsafeCheckpoint):
        load_checkpoint(shards)
    line = one_error_line(capsys, ["fit", *tiny_fit("vanilla"), "--ckpt_path", str(shards)])
    assert "could run code" in line and not marker.exists()


def test_a_checkpoint_of_objects_loads_only_when_trusted(trained, tmp_path):
    """A model built in Python records its gate object: plain data it is not, so it takes the opt-in."""
    ckpt = torch.load(trained, weights_only=True)
    from ponder_lightning.gates import PerIterationMLPGate

    ckpt["hyper_parameters"] = {
        k: v for k, v in ckpt["hyper_parameters"].items() if k not in ("_class_path", "_instantiator", "regularizer")
    } | {"gate": PerIterationMLPGate()}
    torch.save(ckpt, tmp_path / "objects.ckpt")
    from ponder_lightning.models import AdaPonderLM

    with pytest.raises(UnsafeCheckpoint, match="PerIterationMLPGate"):
        load_checkpoint(tmp_path / "objects.ckpt", AdaPonderLM)
    with pytest.warns(UserWarning, match="arbitrary code"):
        model, _ = load_checkpoint(tmp_path / "objects.ckpt", AdaPonderLM, trusted=True)
    reference, _ = load_checkpoint(trained)
    ids = torch.randint(0, 257, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))


# -- exports never touch the user's files -------------------------------------------------------------


USER_FILES = ("vocab.json", "merges.txt", "config.json", "model.safetensors", "notes.txt")


def test_export_never_deletes_or_replaces_the_users_files(capsys, trained, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    for name in USER_FILES:
        (out / name).write_text(f"the user's {name}")
    before = {name: (out / name).read_bytes() for name in USER_FILES}
    line = one_error_line(capsys, ["export", "--checkpoint", str(trained), "--out", str(out)])
    assert "config.json" in line and "vocab.json" in line and "--overwrite" in line
    assert {name: (out / name).read_bytes() for name in USER_FILES} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(USER_FILES)

    # A folder with only unrelated files, or one an export wrote, is fine; re-exporting replaces
    # only what the export wrote (here: another format), and nothing else.
    out = tmp_path / "exported"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for fmt in ("transformers", "backbone", "transformers"):
        main(["export", "--checkpoint", str(trained), "--out", str(out), "--format", fmt])
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "modeling_ponder_lightning.py").is_file()
    load_checkpoint(out)
    # A file the user changed after the export is theirs now.
    (out / "generation_config.json").write_text("{}  ")
    line = one_error_line(capsys, ["export", "--checkpoint", str(trained), "--out", str(out)])
    assert "generation_config.json" in line and (out / "generation_config.json").read_text() == "{}  "
    main(["export", "--checkpoint", str(trained), "--out", str(out), "--format", "transformers", "--overwrite"])
    assert (out / "generation_config.json").read_text() != "{}  "


def test_exported_files_get_the_users_umask(trained, tmp_path):
    previous = os.umask(0o022)
    try:
        main(["export", "--checkpoint", str(trained), "--out", str(tmp_path / "out")])
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


# -- output paths are checked before the work ---------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["evaluate", "--checkpoint", "{ckpt}", "--out", "{bad}"],
        ["export", "--checkpoint", "{ckpt}", "--out", "{bad}"],
        ["lm_eval", "--checkpoint", "{ckpt}", "--tasks", "x", "--output", "{bad}/results.json"],
        ["prepare", "--data_files", "{tmp}/missing.txt", "--out", "{bad}"],
    ],
    ids=lambda a: a[0],
)
def test_an_unwritable_output_is_refused_before_any_model_is_loaded(capsys, tmp_path, argv):
    ckpt, marker = hostile_checkpoint(tmp_path)  # were it opened, the marker would appear
    (tmp_path / "a_file").write_text("")
    bad = tmp_path / "a_file" / "sub"  # a directory cannot be made under a file
    filled = [a.format(ckpt=ckpt, bad=bad, tmp=tmp_path) for a in argv]
    line = one_error_line(capsys, filled)
    assert str(tmp_path / "a_file") in line and "--out" in line or "--output" in line, line
    assert not marker.exists()


# -- SIGTERM saves, exits 143 and says so ------------------------------------------------------------

ARGS = [*tiny_fit("adaponderlm", seq_len=48, batch_size=4), "--model.init_args.lr", "3e-3"]
ARGS += ["--model.init_args.gate_start_step", "2"]
STEPS, SIGTERM_AT = 8, 5


def sigterm_overlay(tmp_path: Path, name: str, losses: Path, sigterm_at: int | None = None) -> str:
    callbacks = [
        {
            "class_path": "ponder_lightning.training.AtomicModelCheckpoint",
            "init_args": {"save_last": True, "every_n_train_steps": 100},  # no periodic save before the signal
        },
        {"class_path": "scaleout_helpers.LossDump", "init_args": {"path": str(losses)}},
    ]
    if sigterm_at is not None:
        callbacks.append({"class_path": "scaleout_helpers.SigtermAtStep", "init_args": {"step": sigterm_at}})
    return trainer_overlay(tmp_path / f"{name}.yaml", STEPS, callbacks)


@pytest.mark.parametrize("trainer_config", [None, "ddp_cpu.yaml"], ids=["one_process", "ddp"])
def test_sigterm_saves_exits_143_and_resumes_exactly(tmp_path, trainer_config):
    cache = ["--data.cache_dir", str(tmp_path / "cache")]
    distributed = ["--config", str(ROOT / "configs" / "trainer" / trainer_config)] if trainer_config else []
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    straight.mkdir(), stopped.mkdir()
    result = run_fit(
        *ARGS,
        *cache,
        *distributed,
        "--config",
        sigterm_overlay(straight, "o", straight / "losses.jsonl"),
        "--trainer.default_root_dir",
        str(straight),
        cwd=straight,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    common = [*ARGS, *cache, *distributed, "--trainer.default_root_dir", str(stopped)]
    losses = stopped / "losses.jsonl"
    killed = run_fit(*common, "--config", sigterm_overlay(stopped, "k", losses, SIGTERM_AT), cwd=stopped)
    assert killed.returncode == 143, killed.stderr[-3000:]
    checkpoint = stopped / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    message = f"stopped by SIGTERM at step {SIGTERM_AT}/{STEPS}: saved {checkpoint}; resume with --ckpt_path last"
    assert killed.stderr.count(message) == 1, killed.stderr[-3000:]
    assert torch.load(checkpoint, weights_only=True)["global_step"] == SIGTERM_AT
    assert logged_steps(losses) == list(range(SIGTERM_AT))

    resumed = run_fit(*common, "--config", sigterm_overlay(stopped, "r", losses), "--ckpt_path", "last", cwd=stopped)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_steps(losses) == list(range(STEPS))
    straight_losses = read_losses(straight / "losses.jsonl")
    for step, loss in read_losses(losses).items():
        assert loss == pytest.approx(straight_losses[step], abs=1e-6), step


# -- Ctrl-C in generate ---------------------------------------------------------------------------------


def test_ctrl_c_in_generate_prints_what_was_generated_and_exits_130(capsys, trained, monkeypatch):
    real_sample, calls = generate_module.sample, []

    def interrupted_sample(logits, *args, **kwargs):
        calls.extend([1] * logits.shape[0])  # decode ticks where no token finished sample no row
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_sample(logits, *args, **kwargs)

    monkeypatch.setattr(generate_module, "sample", interrupted_sample)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--checkpoint", str(trained), "--prompt", "ab", "--max_new_tokens", "20"])
    assert exit_info.value.code == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "interrupted" in captured.out
    depths = next(line for line in captured.out.splitlines() if line.startswith("depth per generated token"))
    assert len(re.findall(r":\d+(?= |$)", depths)) == 3, depths  # the three tokens sampled before Ctrl-C


def test_load_checkpoint_of_a_class_that_is_no_model_names_it(tmp_path):
    torch.save({"hyper_parameters": {"_class_path": "torch.nn.Linear", "in_features": 2}}, tmp_path / "x.ckpt")
    with pytest.raises(UserError, match="torch.nn.Linear is not a ponder_lightning model"):
        load_checkpoint(tmp_path / "x.ckpt")


# -- a study checks every run before the first trains ---------------------------------------------------


@pytest.mark.parametrize(
    "broken, culprit",
    [
        ({"configs": ["configs/vanilla.yaml", "configs/no_such.yaml"]}, "configs/no_such.yaml does not exist"),
        ({"configs": ["configs/vanilla.yaml"], "args": ["--model.init_args.lr", "-1"]}, "model.init_args.lr"),
    ],
    ids=["missing_config", "bad_argument"],
)
def test_a_study_with_a_broken_second_run_fails_before_the_first_trains(capsys, tmp_path, broken, culprit):
    import yaml

    study = {
        "out": str(tmp_path / "out"),
        "base": ["studies/small_base.yaml"],
        "args": ["--trainer.max_steps", "1", "--model.init_args.size", "tiny", "--data.tokenizer", "bytes"],
        "runs": {"first": {"configs": ["configs/vanilla.yaml"]}, "second": broken},
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    line = one_error_line(capsys, ["study", "--config", str(tmp_path / "study.yaml")])
    assert "run second" in line and culprit in line, line
    assert not (tmp_path / "out" / "runs").exists()  # nothing trained


# -- the smaller items ----------------------------------------------------------------------------------


def test_a_hub_tokenizer_without_network_fails_at_once_with_the_fix(monkeypatch):
    import socket

    from ponder_lightning.data import load_tokenizer

    probes = []

    def unreachable(address, timeout=None, *args, **kwargs):
        probes.append((address, timeout))
        raise OSError("network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(UserError, match="hub cannot be reached.*HF_HUB_OFFLINE=1"):
        load_tokenizer("some-org/some-tokenizer")
    assert len(probes) == 1 and probes[0][1] == 3.0  # one short probe, not a minute of retries


def test_a_byte_order_mark_in_a_text_file_is_not_content(tmp_path):
    from ponder_lightning.data.sources import FileSource

    (tmp_path / "a.txt").write_bytes("\ufeffhello".encode())
    assert list(FileSource(tmp_path / "a.txt").documents("text")) == ["hello"]


def test_a_damaged_last_ckpt_points_to_last_good(capsys, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "last.ckpt").write_bytes(b"half a checkpoint")
    torch.save({"global_step": 1}, checkpoints / "last_good.ckpt")
    line = one_error_line(capsys, ["fit", *tiny_fit("vanilla"), "--ckpt_path", str(checkpoints / "last.ckpt")])
    assert "damaged" in line and f"--ckpt_path {checkpoints / 'last_good.ckpt'}" in line, line


def test_a_configuration_error_under_ddp_is_printed_once(tmp_path):
    (tmp_path / "tiny.txt").write_text("tiny text")
    result = run_fit(
        *tiny_fit("vanilla", batch_size=4),
        "--config",
        str(ROOT / "configs" / "trainer" / "ddp_cpu.yaml"),
        "--data.data_files",
        str(tmp_path / "tiny.txt"),
        "--data.cache_dir",
        str(tmp_path / "cache"),
        "--trainer.default_root_dir",
        str(tmp_path),
        cwd=tmp_path,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "data.seq_len" in errors[0], result.stderr[-2000:]


def test_the_shipped_lm_eval_task_runs_from_any_directory(trained, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from ponder_lightning.lm_eval_adapter import main as lm_eval_main

    monkeypatch.chdir(tmp_path)  # not the repository root, where the task's examples lie
    fixtures = ROOT / "tests" / "fixtures" / "lm_eval"
    out = lm_eval_main(
        ["--checkpoint", str(trained), "--tasks", "ponder_tiny_choice", "--include_path", str(fixtures)]
        + ["--only_include_path", "--limit", "2", "--bootstrap_iters", "0"]
    )
    assert out["results"]["results"]["ponder_tiny_choice"]["acc,none"] in (0.0, 0.5, 1.0)
