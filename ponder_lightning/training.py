"""Callbacks for long runs: crash-safe checkpoints and the two-stage continued-pretraining schedule."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from weakref import proxy

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from ponder_lightning.errors import UserError


class AtomicModelCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` (same arguments) that never leaves a half-written checkpoint.

    Each checkpoint is written under a temporary name next to its final one and renamed into
    place (`os.replace`), so a run killed while saving keeps its previous checkpoint intact. A
    sharded (directory) checkpoint replaces the old directory by two renames.

    `--ckpt_path last` also finds the newest `last*.ckpt` of earlier runs under the same log
    directory (`<root>/lightning_logs/version_*/checkpoints/`): a restarted command logs to a new
    version, where stock Lightning would find nothing and silently start from scratch.
    """

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
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        found = super()._find_last_checkpoints(trainer)
        if self.dirpath is not None or not trainer.loggers:
            return found
        logger = trainer.loggers[0]
        root = Path(logger.save_dir if logger.save_dir is not None else trainer.default_root_dir) / str(logger.name)
        pattern = f"*/checkpoints/{self.CHECKPOINT_NAME_LAST}*{self.FILE_EXTENSION}"
        return found | {os.path.normpath(p) for p in root.glob(pattern)}


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

    def __init__(self, steps: int) -> None:
        if steps < 0:
            raise UserError(f"GateOnlyStage steps={steps} is invalid: use a number of optimizer steps >= 0")
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
            rank_zero_warn("GateOnlyStage on a randomly initialised backbone: set model.init_args.pretrained to start from Pythia")
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
