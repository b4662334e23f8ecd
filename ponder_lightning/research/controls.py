"""Counterfactual gates of the gate study (`research/gate_study.py`), on top of the library's
(`gates/controls.py`): full depth that records what the first decision saw (for probes), and
halting by a priority the caller computed. A priority computed from the targets is an oracle, a
bound on what any gate could choose, not a gate one could deploy."""

from __future__ import annotations

import math

from torch import Tensor

from ponder_lightning.gates import FullDepth, Gate
from ponder_lightning.gates.controls import GateControl
from ponder_lightning.nn.gate import GateDecision


class RecordingFullDepth(FullDepth):
    """`FullDepth` that also keeps what the gate saw at the first decision (the readout of the
    first pass, [B, T, d] per forward, in call order): the input a gate has to go on when it
    decides, for probes fitted to what the passes do."""

    def __init__(self, gate: Gate) -> None:
        super().__init__(gate)
        self.first_inputs: list[Tensor] = []

    def forward(self, h: Tensor, iteration: int, active: Tensor, tokens: Tensor, positions: Tensor) -> GateDecision:
        if iteration == 0:
            self.first_inputs.append(h.detach())
        return super().forward(h, iteration, active, tokens, positions)


class RankedPruning(GateControl):
    """Halts the active tokens whose `priority` falls below decision i's `cutoffs[i]`, keeping the
    learned scores as feedback weights. The priority is fixed per token, so the halting is nested
    (monotone) whenever the cut-offs rise; `research.gate_study.ranked_cutoffs` picks them so that iteration i
    runs for the learned fraction of tokens.

    `priority` [B, T] belongs to one batch: the caller sets it before each forward (the evaluation
    loop does), since a gate only ever sees hidden states and token ids.
    """

    def __init__(self, gate: Gate, cutoffs: list[float]) -> None:
        super().__init__(gate)
        if any(math.isnan(c) for c in cutoffs):
            raise ValueError(f"RankedPruning cut-offs must be numbers (-inf and inf included), got {cutoffs}")
        self.cutoffs = cutoffs
        self.priority: Tensor | None = None

    def halt(self, decision: GateDecision, iteration: int, active: Tensor, tokens: Tensor, positions: Tensor) -> Tensor:
        if self.priority is None or self.priority.shape != active.shape:
            raise ValueError(
                f"RankedPruning needs a priority of the batch's shape {tuple(active.shape)} set before each forward"
            )
        return active & (self.priority.to(active.device) >= self.cutoffs[iteration])
