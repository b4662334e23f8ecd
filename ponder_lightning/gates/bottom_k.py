"""Fixed-capacity gate: halt the lowest-scoring fraction of the still-active tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from ponder_lightning.gates.base import halt_below
from ponder_lightning.gates.collectives import distributed_world_size, gather_rows
from ponder_lightning.gates.mlp import FeedbackScale, PerIterationMLPGate
from ponder_lightning.nn.gate import GateDecision
from ponder_lightning.validation import (
    ClosedUnitInterval,
    FiniteFloat,
    HalfOpenUnitInterval,
    PositiveInt,
    check_init_args,
)


class BottomKGate(PerIterationMLPGate):
    """In training, each decision halts the `ratio` lowest-scoring fraction of the active tokens of
    the whole batch (a rank, as in mixture-of-depths). A batch-wide rank would look at future
    tokens at decode time, so in eval mode the gate instead halts below a threshold learned in
    training: an exponential moving average of the rank's cut-off score, per decision.

    The cut-off is the `n_halt`-th smallest active score, `n_halt = int(ratio * active tokens)`,
    and every active token scoring at or below it halts (ties at the cut-off all halt). Across
    ranks (torch.distributed initialised, world size > 1) it is taken over the global batch: the
    ranks gather each other's detached scores, so the cut-off, the tokens that halt and the
    learned thresholds equal one process on the same global batch.

    Args:
        ratio: fraction of the still-active tokens halted at each decision.
        momentum: EMA factor of the learned thresholds.
        hidden_mult, init_bias, feedback: as for PerIterationMLPGate.
    """

    def __init__(
        self,
        ratio: HalfOpenUnitInterval = 0.1,
        momentum: ClosedUnitInterval = 0.99,
        hidden_mult: PositiveInt = 4,
        init_bias: FiniteFloat = 2.0,
        feedback: FeedbackScale = "score",
    ) -> None:
        check_init_args(BottomKGate, locals())
        super().__init__(hidden_mult=hidden_mult, init_bias=init_bias, tau=0.0, feedback=feedback)
        self.ratio, self.momentum = ratio, momentum

    def bind(self, d_model: int, n_decisions: int) -> None:
        super().bind(d_model, n_decisions)
        self.register_buffer("thresholds", torch.zeros(n_decisions))
        self.register_buffer("thresholds_seen", torch.zeros(n_decisions, dtype=torch.bool))

    def forward(self, h: Tensor, iteration: int, active: Tensor, tokens: Tensor, positions: Tensor) -> GateDecision:
        scores = self.scorer(iteration)(h).squeeze(-1).float().sigmoid()
        if not self.training:
            return GateDecision(scores=scores, active=halt_below(scores, active, self.thresholds[iteration]))
        if distributed_world_size() > 1:
            everyone, _ = gather_rows(torch.stack([scores.detach(), active.to(scores.dtype)], dim=1))
            candidates = everyone[:, 0][everyone[:, 1].bool()]
        else:
            candidates = scores.detach()[active]
        n_halt = int(self.ratio * candidates.numel())
        if n_halt == 0:
            return GateDecision(scores=scores, active=active)
        cutoff = candidates.kthvalue(n_halt).values
        self._track(iteration, cutoff)
        return GateDecision(scores=scores, active=active & (scores.detach() > cutoff))

    @torch.no_grad()
    def _track(self, iteration: int, cutoff: Tensor) -> None:
        old = self.thresholds[iteration]
        new = torch.where(self.thresholds_seen[iteration], self.momentum * old + (1 - self.momentum) * cutoff, cutoff)
        self.thresholds[iteration] = new
        self.thresholds_seen[iteration] = True
