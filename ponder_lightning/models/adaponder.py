"""AdaPonderLM: PonderLM with learned, token-wise early exit (per-iteration MLP gates, monotone
halting at tau, KV reuse for halted tokens, bottom-K ponder loss)."""

from __future__ import annotations

from ponder_lightning.gates import BottomKPonderLoss, Gate, PerIterationMLPGate, PonderRegularizer
from ponder_lightning.models.ponder import PonderLM


class AdaPonderLM(PonderLM):
    """PonderLM whose default gate is `PerIterationMLPGate` and default regulariser
    `BottomKPonderLoss`; every argument of PonderLM applies. KV alignment for halted tokens is
    part of the shared recurrence and is active whenever the gate can halt."""

    def default_gate(self) -> Gate:
        return PerIterationMLPGate()

    def default_regularizer(self) -> PonderRegularizer:
        return BottomKPonderLoss()
