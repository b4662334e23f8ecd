"""Callbacks for long runs: crash-safe checkpoints and the two-stage continued-pretraining schedule."""

from __future__ import annotations

import math
import os
import shutil
from collections import deque
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from ponder_lightning.errors import UserError
from ponder_lightning.validation import NonNegativeInt, PositiveFloat, PositiveInt, check_init_args

#: File name of the newest checkpoint whose weights gave a finite, non-spiking training loss.
LAST_GOOD = "last_good.ckpt"


class AtomicModelCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` (same arguments, plus the three below) that never leaves a half-written
    checkpoint and keeps one that is known to be healthy.

    Each checkpoint is written under a temporary name next to its final one and renamed into
    place (`os.replace`), so a run killed while saving keeps its previous checkpoint intact. A
    sharded (directory) checkpoint replaces the old directory by two renames. Temporary files left
    by a run killed while saving are removed when the next run starts.

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
        if stage != "fit":
            return
        if trainer.is_global_zero:
            self._remove_stale_temporaries(trainer)
        previous = sorted(
            self._checkpoint_dirs(trainer),
            key=lambda d: (d / LAST_GOOD).stat().st_mtime if (d / LAST_GOOD).exists() else -1,
        )
        if previous and (previous[-1] / LAST_GOOD).exists():  # a resumed run that diverges at once can go back to it
            self.last_good_path = str(previous[-1] / LAST_GOOD)

    def _checkpoint_dirs(self, trainer: L.Trainer) -> list[Path]:
        """This run's checkpoint directory and, under the default layout, earlier versions' ones."""
        dirs = [Path(self.dirpath)] if self.dirpath else []
        if trainer.loggers:
            logger = trainer.loggers[0]
            root = Path(logger.save_dir if logger.save_dir is not None else trainer.default_root_dir) / str(logger.name)
            dirs += [p for p in root.glob("*/checkpoints") if p.is_dir()]
        return list(dict.fromkeys(d.resolve() for d in dirs if d.is_dir()))

    def _remove_stale_temporaries(self, trainer: L.Trainer) -> None:
        stale = [p for d in self._checkpoint_dirs(trainer) for pattern in (".*.tmp", ".*.old") for p in d.glob(pattern)]
        if not stale:
            return
        size = sum(_size(p) for p in stale)
        for path in stale:
            _remove(path)
        rank_zero_info(
            f"removed {len(stale)} temporary checkpoint file(s) left "
            f"by a run killed while saving ({size / 2**20:.1f} MiB): " + ", ".join(str(p) for p in stale)
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ckpt_path = getattr(trainer, "ckpt_path", None)
        if (
            ckpt_path and Path(ckpt_path).exists()
        ):  # the first step's loss tells whether the resumed weights are healthy
            self._candidate = (trainer.global_step, str(ckpt_path))

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

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        tmp = _temporary_path(filepath)
        if trainer.is_global_zero:
            _remove(tmp)  # left over from a run killed while saving
        trainer.save_checkpoint(tmp, self.save_weights_only)  # ends with a barrier on every rank
        if trainer.is_global_zero:
            _replace(tmp, filepath)
        trainer.strategy.barrier("AtomicModelCheckpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        self._candidate = (trainer.global_step, filepath)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        found = super()._find_last_checkpoints(trainer)
        if self.dirpath is not None or not trainer.loggers:
            return {p for p in found if Path(p).name != LAST_GOOD}
        logger = trainer.loggers[0]
        root = Path(logger.save_dir if logger.save_dir is not None else trainer.default_root_dir) / str(logger.name)
        pattern = f"*/checkpoints/{self.CHECKPOINT_NAME_LAST}*{self.FILE_EXTENSION}"
        found = found | {os.path.normpath(p) for p in root.glob(pattern)}
        return {p for p in found if Path(p).name != LAST_GOOD}  # 'last' is the newest state, good or not


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
        gates = [n for n, p in pl_module.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
        if not gates:
            raise UserError(
                f"GateOnlyStage: {type(pl_module).__name__} has no trainable parameters outside the backbone (its gate "
                "has none), so the gate-only stage would train nothing: use a learned gate or drop the callback"
            )

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        if trainer.global_step < self.steps:
            for p in pl_module.backbone.parameters():
                p.grad = None
        elif trainer.global_step == self.steps and self.steps > 0:
            rank_zero_info(f"GateOnlyStage: step {self.steps}, the backbone now trains jointly with the gates")
