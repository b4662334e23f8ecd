"""AdaPonderLM: PonderLM with learned, token-wise early exit (per-iteration MLP gates, monotone
halting at tau, KV reuse for halted tokens, bottom-K ponder loss)."""

from __future__ import annotations

from typing import Any

from ponder_lightning.gates import BottomKPonderLoss, Gate, PerIterationMLPGate, PonderRegularizer
from ponder_lightning.models.ponder import PonderLM


class AdaPonderLM(PonderLM):
    """PonderLM whose gate defaults to `PerIterationMLPGate` and regulariser to
    `BottomKPonderLoss`; every argument of PonderLM applies. KV alignment for halted tokens is
    part of the shared recurrence and is active whenever the gate can halt."""

    def __init__(self, gate: Gate | None = None, regularizer: PonderRegularizer | None = None, **kwargs: Any) -> None:
        # (the arguments keep their given values: the saved hyper-parameters record None = default)
        super().__init__(
            gate=PerIterationMLPGate() if gate is None else gate,
            regularizer=BottomKPonderLoss() if regularizer is None else regularizer,
            **kwargs,
        )
