"""Training under a known depth: the laboratory's callbacks (the library's are `ponder_lightning.callbacks`)."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from ponder_lightning.errors import UserError
from ponder_lightning.gates import OracleDepth
from ponder_lightning.models.recurrent import TokenRecurrentLM


class TrainAtOracleDepth(Callback):
    """Train and validate with every token halting after the passes its label needs (`OracleDepth`
    around the model's own gate, on a synthetic task of `data.synthetic`): the mechanism check
    with no gate learning that fixed-depth weights cannot give. A model trained at full depth
    never had a token halt, so at the oracle's depth its pass-1 readout is no prediction and its
    later passes attend to K/V they never saw (the oracle rows of a fixed-depth run); trained
    here, it shows whether K/V reuse, the readout and the feedback can carry the task when tokens
    do halt, at the oracle's FLOPs. The model's own gate is unchanged and is what its checkpoint
    holds: evaluated as saved it runs its own depth, and `evaluate`'s oracle rows are the check."""

    def __init__(self) -> None:
        self._stack = ExitStack()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from ponder_lightning.data.synthetic import is_synthetic

        if not isinstance(pl_module, TokenRecurrentLM) or pl_module.n_iterations < 2:
            raise UserError(
                f"TrainAtOracleDepth halts tokens of a token-recurrent model of 2 or more passes, not "
                f"{type(pl_module).__name__}: use PonderLM, LoopTransformer or AdaPonderLM with pondering_steps >= 1"
            )
        if not is_synthetic(getattr(trainer.datamodule, "data_files", None)):
            raise UserError(
                "TrainAtOracleDepth needs the passes each token needs, known only on a synthetic task: "
                "set --data.data_files synthetic:<task>:... (docs/training.md, 'Tasks whose difficulty is known')"
            )

    def _enter(self, pl_module: L.LightningModule, batch: Any) -> None:
        from ponder_lightning.data.synthetic import passes_needed, target_labels

        if isinstance(batch, dict):
            raise UserError("TrainAtOracleDepth reads labels from packed blocks; padded batches carry none")
        oracle = OracleDepth(pl_module.gate)
        oracle.needs = passes_needed(target_labels(batch)).clamp(max=pl_module.n_iterations)
        self._stack.enter_context(pl_module.with_gate(oracle))

    def _exit(self) -> None:
        self._stack.close()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._enter(pl_module, batch)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._exit()

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._enter(pl_module, batch)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._exit()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._exit()
