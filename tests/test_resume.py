"""Crash safety on one process: a run SIGKILLed at an arbitrary step continues bit-identically with
`--ckpt_path last`; checkpoints appear atomically; a NaN loss stops training with one line and
keeps the last good checkpoint."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fit_helpers import quiet_fit_on, tiny_fit, trainer_overlay
from scaleout_helpers import logged_steps, read_losses, run_fit

from ponder_lightning.training import AtomicModelCheckpoint

pytestmark = pytest.mark.timeout(300)

# AdaPonderLM with every moving part in play within 8 steps: the gate switches on at step 2, the
# bottom-K ponder loss ramps from step 3, warmup + cosine LR, a validation every 3 steps.
ARGS = [
    *tiny_fit("adaponderlm", seq_len=48, batch_size=4),
    "--model.init_args.lr",
    "3e-3",
    "--model.init_args.warmup_fraction",
    "0.25",
    "--model.init_args.gate_start_step",
    "2",
    "--model.init_args.regularizer.init_args.start_step",
    "3",
    "--model.init_args.regularizer.init_args.ramp_steps",
    "2",
]
STEPS = 8


def overlay(tmp_path: Path, name: str, losses: Path, every: int, extra: list[dict] | None = None) -> str:
    callbacks = [
        {
            "class_path": "ponder_lightning.training.AtomicModelCheckpoint",
            "init_args": {"save_last": True, "every_n_train_steps": every},
        },
        {"class_path": "scaleout_helpers.LossDump", "init_args": {"path": str(losses)}},
        *(extra or []),
    ]
    return trainer_overlay(tmp_path / f"{name}.yaml", STEPS, callbacks, val_check_interval=3, limit_val_batches=1)


def last_checkpoint(root: Path, version: int) -> dict:
    return torch.load(root / "lightning_logs" / f"version_{version}" / "checkpoints" / "last.ckpt", weights_only=False)


def test_killed_run_resumes_bit_identically(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    straight.mkdir(), broken.mkdir()
    result = run_fit(
        *ARGS,
        "--data.cache_dir",
        str(tmp_path / "cache"),
        "--config",
        overlay(straight, "o", straight / "losses.jsonl", every=2),
        "--trainer.default_root_dir",
        str(straight),
        cwd=straight,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    kill = [{"class_path": "scaleout_helpers.KillAtStep", "init_args": {"step": 5}}]
    common = [*ARGS, "--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(broken)]
    killed = run_fit(
        *common, "--config", overlay(broken, "killed", broken / "losses.jsonl", every=2, extra=kill), cwd=broken
    )
    assert killed.returncode != 0
    assert last_checkpoint(broken, 0)["global_step"] == 4  # the step-5 checkpoint never happened
    resumed = run_fit(
        *common,
        "--config",
        overlay(broken, "resumed", broken / "losses.jsonl", every=2),
        "--ckpt_path",
        "last",
        cwd=broken,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert logged_steps(broken / "losses.jsonl") == [0, 1, 2, 3, 4, 4, 5, 6, 7]  # continued from step 4
    assert read_losses(broken / "losses.jsonl") == read_losses(straight / "losses.jsonl")  # bit-identical
    a, b = last_checkpoint(straight, 0), last_checkpoint(broken, 1)
    assert a["global_step"] == b["global_step"] == STEPS
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    poison = [{"class_path": "scaleout_helpers.PoisonAtStep", "init_args": {"step": 3}}]
    result = run_fit(
        *ARGS,
        "--config",
        overlay(tmp_path, "o", tmp_path / "losses.jsonl", every=1, extra=poison),
        "--trainer.default_root_dir",
        str(tmp_path),
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training loss became nan at step 3" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=3.ckpt", "last.ckpt", "last_good.ckpt"]
    # The step-3 checkpoint was never trained on (the loss of its weights is unknown): the error
    # names the newest one whose next loss was healthy.
    assert f"--ckpt_path {checkpoints / 'last_good.ckpt'}" in errors[0] and "(step 2)" in errors[0]
    assert torch.load(checkpoints / "last_good.ckpt", weights_only=False)["global_step"] == 2
    good = last_checkpoint(tmp_path, 0)
    assert good["global_step"] == 3
    assert all(torch.isfinite(t).all() for t in good["state_dict"].values())


class _Trainer(SimpleNamespace):
    """The parts of a Trainer that AtomicModelCheckpoint._save_checkpoint touches."""

    def __init__(self, write) -> None:
        super().__init__(
            is_global_zero=True, global_step=7, loggers=[], strategy=SimpleNamespace(barrier=lambda name=None: None)
        )
        self.write = write

    def save_checkpoint(self, path: str, weights_only: bool = False) -> None:
        self.write(Path(path))


@pytest.mark.parametrize("sharded", [False, True])
def test_checkpoints_replace_the_old_one_atomically(tmp_path, sharded):
    target = tmp_path / "last.ckpt"

    def write(content: str, fail: bool = False):
        def writer(path: Path) -> None:
            if sharded:  # FSDP's distributed checkpoint is a directory of shards
                path.mkdir()
                (path / "shard_0.distcp").write_text(content)
            else:
                path.write_text(content)
            if fail:
                raise OSError("No space left on device")

        return writer

    def content() -> str:
        return (target / "shard_0.distcp").read_text() if sharded else target.read_text()

    callback = AtomicModelCheckpoint()
    callback._save_checkpoint(_Trainer(write("first")), str(target))
    assert content() == "first"
    with pytest.raises(OSError, match="No space"):
        callback._save_checkpoint(_Trainer(write("half-writ", fail=True)), str(target))
    assert content() == "first"  # a failed or killed save never touches the previous checkpoint
    callback._save_checkpoint(_Trainer(write("second")), str(target))  # cleans up the leftover
    assert content() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert callback._last_global_step_saved == 7


# -- a resume keeps the run's data: a changed split or seed is refused ------------------------------
def test_resume_with_another_data_split_or_seed_is_refused(tmp_path, capsys):
    import json

    from ponder_lightning.cli import main

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} " * 6}) + "\n" for i in range(40)))
    args = ["fit", *tiny_fit("vanilla", seq_len=16, batch_size=2), *quiet_fit_on(docs, tmp_path)]
    main([*args, "--trainer.max_steps", "2"])
    resume = [
        *args,
        "--trainer.max_steps",
        "3",
        "--ckpt_path",
        str(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"),
    ]
    for change, named in (
        (["--data.val_fraction", "0.3"], "data.val_fraction changed"),
        (["--data.seed", "7"], "data.seed=1234 but data.seed=7"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*resume, *change])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        line = err.strip().splitlines()[-1]
        assert line.startswith("error:") and named in line and "start a new run" in line, err[-2000:]
    main(resume)  # the run's own settings resume


def test_a_run_touches_only_its_own_and_its_resumed_checkpoints(tmp_path, caplog):
    """`last_good.ckpt` of another experiment under the same root is never a fresh run's rewind
    target, and only the run's own directory is cleaned of temporaries (another run may be
    writing elsewhere); those next to the resumed checkpoint are named."""
    import lightning as L

    other = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    other.mkdir(parents=True)
    for name in ("last.ckpt", "last_good.ckpt", ".last.ckpt.tmp"):
        (other / name).write_bytes(b"x")
    own = tmp_path / "own"
    own.mkdir()
    (own / ".last.ckpt.tmp").write_bytes(b"x")
    for dirpath in (None, own):
        callback = AtomicModelCheckpoint(save_last=True, dirpath=dirpath)
        trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[callback], logger=True, enable_progress_bar=False)
        callback.setup(trainer, None, "fit")
        assert callback.last_good_path is None  # a fresh run: nothing of its own is known to be healthy
    assert (other / ".last.ckpt.tmp").exists() and not (own / ".last.ckpt.tmp").exists()

    trainer.ckpt_path = str(other / "last.ckpt")  # resumed from version_0
    with caplog.at_level("INFO"):
        callback.on_train_start(trainer, None)
    assert callback.last_good_path == str(other / "last_good.ckpt")
    assert f"{other} holds 1 temporary checkpoint file(s)" in caplog.text and (other / ".last.ckpt.tmp").exists()
