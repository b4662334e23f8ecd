"""A progress bar that counts optimizer steps in step-based runs.

Runs here are set by `max_steps` (the epoch is an artefact of the sampler's length), so Lightning's
bar showed `Epoch 0/-2` (max_epochs=-1 minus one) and batch counts of an "epoch" that never ends
(`10/5` after a resume). With `max_steps` set this bar reads `Step 10/300`, from the trainer's
global step, so a resumed run continues where it stopped; otherwise it is Lightning's own bar.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

from ponder_lightning.upstream import RICH_AVAILABLE, RichProgressBarHooks


def _step_based(trainer: L.Trainer) -> bool:
    return trainer.max_steps is not None and trainer.max_steps > 0


class _StepCounting:
    """Mixin for Lightning's bars: total = max_steps, position = global step."""

    trainer: L.Trainer

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if _step_based(self.trainer) else super().total_train_batches  # type: ignore[misc]


class StepRichProgressBar(_StepCounting, RichProgressBarHooks):
    def train_description(self, current_epoch: int) -> str:
        if not _step_based(self.trainer):
            return super().train_description(current_epoch)
        return f"{'Step':{len(self.validation_description)}}"

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if _step_based(trainer):
            self.move_train_bar(trainer.global_step)


class StepTQDMProgressBar(_StepCounting, TQDMProgressBar):
    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if _step_based(trainer):
            self.train_progress_bar.set_description("Step")
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.refresh()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if _step_based(trainer) and self.train_progress_bar.n != trainer.global_step:
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.refresh()


def step_progress_bar() -> ProgressBar:
    """The bar Lightning would pick (Rich when installed, else tqdm), counting steps."""
    return StepRichProgressBar() if RICH_AVAILABLE else StepTQDMProgressBar()
