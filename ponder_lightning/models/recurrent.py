"""`RecurrentLM`: the parts PonderLM, LoopTransformer and AdaPonderLM share on top of the base —
a pluggable gate, a pluggable compute regulariser, embedding scaling and a gate-only stage."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ponder_lightning.gates import AlwaysContinue, Gate, NoPonderLoss, PonderRegularizer
from ponder_lightning.models.base import CausalLMModule
from ponder_lightning.nn.recurrence import Trace

ALWAYS_CONTINUE = AlwaysContinue()


class RecurrentLM(CausalLMModule):
    """Args:
    gate: decides per token whether to run the next iteration (default: the model's own,
        AlwaysContinue for PonderLM/LoopTransformer, PerIterationMLPGate for AdaPonderLM).
    regularizer: loss on the gate scores (default: the model's own; NoPonderLoss = CE only).
    scale_embeds: multiply token embeddings by sqrt(d) (mixture feedback) or sqrt(2.5 d) (hidden feedback).
    train_only_gates: freeze everything but the gate (continued pretraining's first stage).
    gate_start_step: before this optimizer step the gate is bypassed (every token runs every
        iteration at full weight), so that the model learns to use its passes before gates may
        halt them; from scratch, gates met with an untrained mixture learn to skip it. 0 = gated
        from the start.
    """

    def __init__(
        self,
        gate: Gate | None = None,
        regularizer: PonderRegularizer | None = None,
        scale_embeds: bool = True,
        train_only_gates: bool = False,
        gate_start_step: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.gate = gate if gate is not None else self.default_gate()
        self.gate.bind(self.config.d_model, self.n_iterations - 1)
        self.regularizer = regularizer if regularizer is not None else self.default_regularizer()
        if train_only_gates:
            self.backbone.requires_grad_(False)

    @property
    def gate_active(self) -> bool:
        # Without a trainer (a model loaded for generation), the step is the checkpoint's.
        step = self.global_step if self._trainer is not None else getattr(self, "checkpoint_step", 0)
        return step >= self.hparams.gate_start_step

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.checkpoint_step = checkpoint.get("global_step", 0)

    def effective_gate(self) -> Gate:
        return self.gate if self.gate_active else ALWAYS_CONTINUE

    def default_gate(self) -> Gate:
        return AlwaysContinue()

    def default_regularizer(self) -> PonderRegularizer:
        return NoPonderLoss()

    def aux_loss(self, trace: Trace) -> Tensor | None:
        if not self.gate_active:
            return None
        return self.regularizer(trace.scores, trace.active[:-1], self.global_step)
