"""Callbacks for long runs: crash-safe checkpoints and the two-stage continued-pretraining schedule."""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.optim import Optimizer

from ponder_lightning.errors import UserError
from ponder_lightning.upstream import ModelCheckpointHooks, last_checkpoints
from ponder_lightning.validation import NonNegativeInt, PositiveFloat, PositiveInt, check_init_args

#: File name of the newest checkpoint whose weights gave a finite, non-spiking training loss.
LAST_GOOD = "last_good.ckpt"
#: Exit status of a fit stopped by SIGTERM (128 + 15, the shell's convention).
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


class AtomicModelCheckpoint(ModelCheckpointHooks):
    """`ModelCheckpoint` (same arguments, plus the three below) that never leaves a half-written
    checkpoint and keeps one that is known to be healthy.

    Each checkpoint is written under a temporary name next to its final one and renamed into
    place (`os.replace`), so a run killed while saving keeps its previous checkpoint intact. A
    sharded (directory) checkpoint replaces the old directory by two renames. Temporary files left
    by a run killed while saving are removed when the next run writing to the same directory
    starts; those next to a resumed checkpoint in another directory are only named (another run
    may still be writing there).

    `--ckpt_path last` also finds the newest `last*.ckpt` of earlier runs under the same log
    directory (`<root>/lightning_logs/version_*/checkpoints/`): a restarted command logs to a new
    version, where stock Lightning would find nothing and silently start from scratch.

    `last_good.ckpt`: a checkpoint's weights are only known to be healthy once a training step has
    run on them. When the loss of the first step after a save is finite and not a spike (at most
    `spike_factor` x the median of the last `spike_window` healthy losses), that checkpoint is
    linked to `last_good.ckpt` (a hard link: no extra disk). With frequent checkpoints `last.ckpt`
    may already hold diverged weights; the NaN error names `last_good.ckpt` to resume from.

    Args:
        last_good: keep `last_good.ckpt` as described.
        spike_factor: a loss above this multiple of the recent median counts as a spike.
        spike_window: healthy losses the median is taken over.
    """

    def __init__(
        self, last_good: bool = True, spike_factor: PositiveFloat = 2.0, spike_window: PositiveInt = 50, **kwargs: Any
    ) -> None:
        check_init_args(AtomicModelCheckpoint, locals())
        super().__init__(**kwargs)
        self.last_good, self.spike_factor, self.spike_window = last_good, spike_factor, spike_window
        self._healthy_losses: deque[float] = deque(maxlen=spike_window)
        self._candidate: tuple[int, str] | None = None  # (step, file) saved but not yet confirmed
        self._weights_step = -1
        self._in_spike = False
        self.last_good_path: str | None = None
        self.last_good_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero and self.dirpath:
            # Only this run's own directory: another run may be writing its temporaries elsewhere.
            stale = _stale_temporaries(Path(self.dirpath))
            size = sum(_size(p) for p in stale)
            for path in stale:
                _remove(path)
            if stale:
                rank_zero_info(
                    f"removed {len(stale)} temporary checkpoint file(s) left by a run killed while saving "
                    f"({size / 2**20:.1f} MiB): " + ", ".join(str(p) for p in stale)
                )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._take_sigterm()  # Lightning installs its handlers after on_fit_start, before this hook
        ckpt_path = getattr(trainer, "ckpt_path", None)
        if not ckpt_path or not Path(ckpt_path).exists():
            return
        self._candidate = (trainer.global_step, str(ckpt_path))  # the first step's loss tells if it is healthy
        # Until then, a divergence goes back to the healthy checkpoint of the run resumed (never another run's).
        good = Path(ckpt_path).with_name(LAST_GOOD)
        if good.exists():
            self.last_good_path = str(good)
        elsewhere = Path(ckpt_path).parent
        stale = (
            _stale_temporaries(elsewhere)
            if self.dirpath and elsewhere.resolve() != Path(self.dirpath).resolve()
            else []
        )
        if stale:
            rank_zero_info(
                f"{elsewhere} holds {len(stale)} temporary checkpoint file(s) "
                f"({sum(_size(p) for p in stale) / 2**20:.1f} MiB), left by a run killed while saving or being "
                f"written by one still running: delete them once no run writes there: {', '.join(map(str, stale))}"
            )

    def _promotion_target(self, source: str) -> Path:
        return Path(self.dirpath) / LAST_GOOD if self.dirpath else Path(source).with_name(LAST_GOOD)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._weights_step = trainer.global_step  # the step whose weights this batch's loss measures

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.last_good:
            self._judge_loss(trainer, outputs)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._stop_requested(trainer):
            self._stop(trainer)

    def _take_sigterm(self) -> None:
        """Take SIGTERM over from Lightning while training (its handler sets a flag on which the run
        exits 0 without a checkpoint: a preempted job would lose up to every_n_train_steps steps
        and report success). Its handler is put back when training ends."""
        self._sigterm = None
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._restore_handler()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        if not isinstance(exception, SIGTERMException):  # saved already: `_stop`
            super().on_exception(trainer, pl_module, exception)

    def _restore_handler(self) -> None:
        previous = getattr(self, "_previous_handler", None)
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
        self._previous_handler = None

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._sigterm = signum  # acted on after the current optimizer step (`on_train_batch_end`)

    def _stop_requested(self, trainer: L.Trainer) -> bool:
        """Whether any rank was sent SIGTERM: every rank asks after every optimizer step, so all
        stop after the same one (one all-reduce of one number per step under DDP/FSDP, as
        Lightning's own check)."""
        local = getattr(self, "_sigterm", None) is not None
        if trainer.world_size == 1:
            return local
        flag = torch.tensor(float(local), device=trainer.strategy.root_device)
        return bool(trainer.strategy.reduce(flag, reduce_op="sum").item() > 0)

    def _stop(self, trainer: L.Trainer) -> None:
        """Save last.ckpt (atomically) unless this step's is saved, say so, and exit 143."""
        step = trainer.global_step
        if self.save_last:
            if not (self.saved_at(step) and self.last_model_path):
                self.save_last_now(trainer)
            saved = f"saved {self.last_model_path}; resume with --ckpt_path last"
        else:
            saved = "no checkpoint saved (the checkpoint callback's save_last is off)"
        total = f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        if trainer.is_global_zero:
            print(f"stopped by SIGTERM at step {step}{total}: {saved}", file=sys.stderr, flush=True)
        raise SIGTERMException(SIGTERM_EXIT_CODE)

    def _judge_loss(self, trainer: L.Trainer, outputs: Any) -> None:
        """Promote the newest checkpoint to last_good.ckpt when the loss on its weights is healthy."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        value = float(trainer.strategy.reduce(loss.detach().float().clone(), reduce_op="mean"))
        recent = sorted(self._healthy_losses)
        median = recent[len(recent) // 2] if recent else None
        healthy = math.isfinite(value) and (median is None or value <= self.spike_factor * median)
        if not healthy:
            if not self._in_spike and math.isfinite(value):  # once per spike, not once per step
                rank_zero_warn(
                    f"training loss {value:.4g} at step {self._weights_step} is a spike (over "
                    f"{self.spike_factor:g}x the recent median {median:.4g}): {LAST_GOOD} "
                    f"stays at {self.last_good_path or 'none yet'} until the loss recovers"
                )
            self._in_spike = True
            self._candidate = None
            return
        self._in_spike = False
        self._healthy_losses.append(value)
        if self._candidate is not None and self._candidate[0] == self._weights_step:
            self._promote(trainer, *self._candidate)
            self._candidate = None

    def _promote(self, trainer: L.Trainer, step: int, source: str) -> None:
        target = self._promotion_target(source)
        if trainer.is_global_zero and Path(source).exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temporary_path(str(target))
            _remove(tmp)
            if Path(source).is_dir():
                shutil.copytree(source, tmp)
            else:
                try:
                    os.link(
                        source, tmp
                    )  # the same bytes, no copy (last.ckpt is replaced by a new file, never rewritten)
                except OSError:
                    shutil.copyfile(source, tmp)
            _replace(tmp, str(target))
        trainer.strategy.barrier("AtomicModelCheckpoint.last_good")
        self.last_good_path, self.last_good_step = str(target), step

    def write_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        tmp = _temporary_path(filepath)
        if trainer.is_global_zero:
            _remove(tmp)  # left over from a run killed while saving
        trainer.save_checkpoint(tmp, self.save_weights_only)  # ends with a barrier on every rank
        if trainer.is_global_zero:
            _replace(tmp, filepath)
        trainer.strategy.barrier("AtomicModelCheckpoint")
        self.mark_saved(trainer, filepath)
        self._candidate = (trainer.global_step, filepath)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        found = super().find_last_checkpoints(trainer)
        if self.dirpath is None and trainer.loggers:
            pattern = f"*/checkpoints/{self.CHECKPOINT_NAME_LAST}*{self.FILE_EXTENSION}"
            found |= {os.path.normpath(p) for p in log_root(trainer).glob(pattern)}
        return {p for p in found if Path(p).name != LAST_GOOD}  # 'last' is the newest state, good or not


def log_root(trainer: L.Trainer) -> Path:
    """`<save_dir>/<name>` of the trainer's first logger, whose `version_*` hold the runs' checkpoints."""
    logger = trainer.loggers[0]
    return Path(logger.save_dir if logger.save_dir is not None else trainer.default_root_dir) / str(logger.name)


def find_last_checkpoint(trainer: L.Trainer) -> str | None:
    """The checkpoint `ckpt_path="last"` loads, picked as Lightning's checkpoint connector picks it:
    the newest (by modification time) of the `last*.ckpt` the trainer's checkpoint callbacks find
    (`AtomicModelCheckpoint.find_last_checkpoints`) and of an `OnExceptionCheckpoint`'s file."""
    candidates = {getattr(c, "ckpt_path", None) for c in trainer.callbacks if isinstance(c, OnExceptionCheckpoint)}
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            candidates |= last_checkpoints(callback, trainer)
    return max((p for p in candidates if p and os.path.exists(p)), key=os.path.getmtime, default=None)


def last_checkpoint_dirs(trainer: L.Trainer) -> list[str]:
    """Where `find_last_checkpoint` looks, for a message that found nothing."""
    dirs = []
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "dirpath", None) or not trainer.loggers:
            dirs.append(str(callback.dirpath or Path(trainer.default_root_dir) / "checkpoints"))
        else:  # stock ModelCheckpoint: only the new run's own (empty) version directory
            version = "version_*" if isinstance(callback, AtomicModelCheckpoint) else trainer.loggers[0].version
            dirs.append(
                str(log_root(trainer) / (version if isinstance(version, str) else f"version_{version}") / "checkpoints")
            )
    return list(dict.fromkeys(dirs))


def resume_hint(trainer: L.Trainer | None) -> str:
    """Where to resume after a divergence: the newest checkpoint known to be healthy."""
    callbacks = [c for c in getattr(trainer, "checkpoint_callbacks", []) or [] if isinstance(c, AtomicModelCheckpoint)]
    good = next((c for c in callbacks if c.last_good_path is not None), None)
    if good is None:
        return "no checkpoint of this run is known to be healthy: restart with a lower model.init_args.lr"
    step = f" (step {good.last_good_step})" if good.last_good_step is not None else ""
    return (
        f"resume from the last checkpoint saved while the loss was healthy{step} with a lower learning rate: "
        f"--ckpt_path {good.last_good_path} --model.init_args.lr <lower>"
    )


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def _stale_temporaries(directory: Path) -> list[Path]:
    """Files and directories `write_checkpoint` / `_replace` write before renaming into place."""
    return [p for pattern in (".*.tmp", ".*.old") for p in directory.glob(pattern)]


def _temporary_path(filepath: str) -> str:
    path = Path(filepath)
    return str(path.with_name(f".{path.name}.tmp"))


def _remove(path: str | Path) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _replace(tmp: str, filepath: str) -> None:
    """Move `tmp` to `filepath`: one atomic rename for files, two renames for directories."""
    target = Path(filepath)
    if Path(tmp).is_dir() and target.exists():
        old = target.with_name(f".{target.name}.old")
        _remove(old)
        os.replace(target, old)
        os.replace(tmp, target)
        _remove(old)
        return
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    os.replace(tmp, target)


def require_trainable_gates(model: L.LightningModule, setting: str, fix: str) -> None:
    """A stage that trains only the parameters outside the backbone (the gates) needs some: with a
    gate that has none (AlwaysContinue, FixedRatioGate, ...) the optimizer would get no parameter
    (or no gradient) at all. Shared by `GateOnlyStage` and the models' `train_only_gates`."""
    if not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("backbone.")):
        raise UserError(
            f"{setting}: {type(model).__name__} has no trainable parameters outside the backbone (its gate "
            f"{type(model.gate).__name__} has none), so it would train nothing: {fix}"
        )


class GateOnlyStage(Callback):
    """Continued pretraining's two stages in one run: for the first `steps` optimizer steps only
    the parameters outside the backbone (the gates) are updated; from then on everything trains.

    The backbone stays registered with the optimizer and with DDP/FSDP from the start and its
    gradients are dropped before each first-stage optimizer step (AdamW then skips it entirely: no
    update, no moment, no weight decay). So the switch needs no re-wrapping, and a run resumed in
    either stage continues exactly. The first stage therefore costs as much per step as joint
    training; for the cheaper permanent freeze use the model's `train_only_gates: true` instead.

    Args:
        steps: optimizer steps of the gate-only stage (the backbone is updated from this step on).
    """

    def __init__(self, steps: NonNegativeInt) -> None:
        check_init_args(GateOnlyStage, locals())
        self.steps = steps

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if getattr(pl_module.hparams, "train_only_gates", False):
            raise UserError(
                "GateOnlyStage and model.init_args.train_only_gates=true are both set: train_only_gates freezes the "
                "backbone for the whole run; drop it to train jointly after the gate-only stage"
            )
        if pl_module.hparams.get("pretrained") is None and not getattr(trainer, "ckpt_path", None):
            rank_zero_warn(
                "GateOnlyStage on a randomly initialised backbone: set model.init_args.pretrained to start from Pythia"
            )
        require_trainable_gates(pl_module, "GateOnlyStage", "use a learned gate or drop the callback")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        if trainer.global_step < self.steps:
            for p in pl_module.backbone.parameters():
                p.grad = None
        elif trainer.global_step == self.steps and self.steps > 0:
            rank_zero_info(f"GateOnlyStage: step {self.steps}, the backbone now trains jointly with the gates")
