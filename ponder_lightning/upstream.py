"""The one module that reaches into Lightning's internals (names with a leading underscore).

Everything else in the package uses the public APIs of Lightning and jsonargparse only (torch's
own internals, which `nn` needs for its CPU kernels, stay in `nn/torch_internals.py`). Where no
public hook does the job, the private step is wrapped here under a public name, so that:

- a Lightning upgrade that moves one breaks here, where `tests/test_upstream.py` checks that each
  name still exists with the signature used, not somewhere in the CLI's resume logic;
- `tests/test_upstream.py` also greps the rest of the package for underscore names of these
  libraries, so a new one has to come through this module.

What is wrapped, and why no public API serves:
- `LightningCLI._parse_ckpt_path` loads a checkpoint's saved init args into the config before any
  class is built, for every subcommand; fit must resume the *configured* model instead, and the
  others must check the saved args first (`cli.PonderCLI.check_ckpt_path`).
- `ModelCheckpoint._save_checkpoint` writes one file in place; `AtomicModelCheckpoint` writes it
  atomically (the `CheckpointIO` plugin would need every config to configure it), and
  `_find_last_checkpoints` is what `ckpt_path="last"` resolves through.
- `RichProgressBar._get_train_description` / `_update`: the bar's text and position, counted in
  optimizer steps.
- `ModelSummary._get_summary_data`, the callback's `_summary` and `_max_depth`: the layer table,
  printed with the analytic FLOPs; `ThroughputMonitor._throughputs`: setting a peak FLOP/s;
  `LightningModule._trainer`: whether a model is attached to a trainer, without the error.
- `_given_hyperparameters_context`: what `LightningModule.load_from_checkpoint` uses to record
  a rebuilt model's hparams as LightningCLI saved them; `_load_distributed_checkpoint` and
  `_METADATA_FILENAME`: reading an FSDP checkpoint directory on one process.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.load import _METADATA_FILENAME, _load_distributed_checkpoint
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, ThroughputMonitor
from lightning.pytorch.callbacks import ModelSummary as ModelSummaryCallback
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from lightning.pytorch.utilities.model_summary import ModelSummary

#: The file that marks a directory as a distributed (FSDP) checkpoint.
DISTRIBUTED_CHECKPOINT_METADATA: str = _METADATA_FILENAME
#: Whether `rich` is installed (Lightning's own check, which its RichProgressBar uses).
RICH_AVAILABLE: bool = bool(_RICH_AVAILABLE)


def load_distributed_checkpoint(path: Path) -> dict[str, Any]:
    """An FSDP checkpoint directory read into one full state on this process."""
    return _load_distributed_checkpoint(path)


def given_hyperparameters(hparams: dict[str, Any], instantiator: Any) -> AbstractContextManager[None]:
    """Within it, a LightningModule built records `hparams` (and `instantiator`) as its saved
    hyper-parameters, as `load_from_checkpoint` does."""
    return _given_hyperparameters_context(hparams=hparams, instantiator=instantiator)


def summary_rows(summary: ModelSummary) -> list[tuple[str, list[str]]]:
    """The columns of Lightning's model summary table (name, values)."""
    return summary._get_summary_data()


def summary_of(callback: ModelSummaryCallback, trainer: L.Trainer, module: L.LightningModule) -> ModelSummary | None:
    """The model summary a ModelSummary callback would print, None at `max_depth` 0 (none)."""
    return callback._summary(trainer, module) if callback._max_depth else None


def throughputs_of(monitor: ThroughputMonitor) -> dict[Any, Any]:
    """A ThroughputMonitor's per-stage `Throughput` trackers (set up by its `setup`)."""
    return monitor._throughputs


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The trainer `module` is attached to, None when it is not (`module.trainer` would raise)."""
    return module._trainer


def last_checkpoints(callback: ModelCheckpoint, trainer: L.Trainer) -> set[str]:
    """The `last*.ckpt` files a checkpoint callback offers `ckpt_path="last"`."""
    return callback._find_last_checkpoints(trainer)


class CLIHooks(LightningCLI):
    """LightningCLI whose checkpoint-argument step is the public `check_ckpt_path`."""

    def _parse_ckpt_path(self) -> None:
        self.check_ckpt_path()

    def check_ckpt_path(self) -> None:
        """Runs after parsing, before any class is built; by default Lightning's own step."""
        self.load_ckpt_arguments()

    def load_ckpt_arguments(self) -> None:
        """Lightning's step: the checkpoint's saved init args replace the config's model's."""
        super()._parse_ckpt_path()


class ModelCheckpointHooks(ModelCheckpoint):
    """ModelCheckpoint with the steps `AtomicModelCheckpoint` changes under public names."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        self.write_checkpoint(trainer, filepath)

    def write_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """Write one checkpoint file and record it as saved; by default Lightning's step."""
        super()._save_checkpoint(trainer, filepath)

    def mark_saved(self, trainer: L.Trainer, filepath: str) -> None:
        """Record `filepath` as this step's checkpoint (what Lightning's write step records)."""
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath

    def saved_at(self, step: int) -> bool:
        """Whether a checkpoint of optimizer step `step` was saved by this callback."""
        return self._last_global_step_saved == step

    def save_last_now(self, trainer: L.Trainer) -> None:
        """Save last.ckpt now (as at the end of a step), with the current monitored values."""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        return self.find_last_checkpoints(trainer)

    def find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        """The files `ckpt_path="last"` may resolve to; by default Lightning's."""
        return super()._find_last_checkpoints(trainer)


class RichProgressBarHooks(RichProgressBar):
    """RichProgressBar whose training text and position are public methods."""

    def _get_train_description(self, current_epoch: int) -> str:
        return self.train_description(current_epoch)

    def train_description(self, current_epoch: int) -> str:
        """The training bar's label; by default Lightning's `Epoch N/M`."""
        return super()._get_train_description(current_epoch)

    def move_train_bar(self, position: int) -> None:
        """Set the training bar's position."""
        self._update(self.train_progress_bar_id, position)


def private_names() -> Iterator[str]:
    """Every underscore name of Lightning this module uses (what tests/test_upstream.py checks)."""
    yield from (
        "_METADATA_FILENAME",
        "_load_distributed_checkpoint",
        "_given_hyperparameters_context",
        "_RICH_AVAILABLE",
        "_get_summary_data",
        "_summary",
        "_max_depth",
        "_throughputs",
        "_trainer",
        "_find_last_checkpoints",
        "_parse_ckpt_path",
        "_save_checkpoint",
        "_last_global_step_saved",
        "_last_checkpoint_saved",
        "_save_last_checkpoint",
        "_monitor_candidates",
        "_get_train_description",
        "_update",
    )
