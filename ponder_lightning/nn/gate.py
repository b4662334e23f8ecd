"""The gate protocol the recurrence calls after each iteration: which tokens run the next one.

It lives here, below `gates/`, so that the recurrence (nn/) sees the protocol without importing
the gate implementations; those (`gates/`) build on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class GateDecision:
    """`scores`: soft scores s in (0, 1) [B, T] that scale the feedback (None = all 1, no gradient
    path); `active`: the monotone mask m^{i+1}, a subset of the tokens active at iteration i."""

    scores: Tensor | None
    active: Tensor


class Gate(nn.Module):
    """Maps (hidden states after iteration i, i, active mask m^i) to a GateDecision.

    `tokens` (the input ids) is given for gates that need a per-token identity (FixedRatioGate's
    deterministic random draws); `positions` likewise. Neither may be used to look ahead.
    """

    #: False for gates that never halt a token; the recurrence then skips KV alignment entirely.
    can_halt: bool = True

    def bind(self, d_model: int, n_decisions: int) -> None:
        """Create parameters for a model of width `d_model` with `n_decisions` = iterations - 1."""
        self.n_decisions = n_decisions

    def forward(self, h: Tensor, iteration: int, active: Tensor, tokens: Tensor, positions: Tensor) -> GateDecision:
        raise NotImplementedError

    def extra_flops_per_token(self, d_model: int) -> float:
        """FLOPs one decision costs per token (0 for gates without parameters)."""
        return 0.0

    def feedback_scale(self, scores: Tensor) -> Tensor:
        """The factor s^i in the feedback weight m^{i+1} * s^i, from this gate's scores (the
        scores themselves, as in the paper; a gate may pass only their gradient)."""
        return scores


class AlwaysContinue(Gate):
    """Every token runs every iteration: PonderLM and LoopTransformer as published."""

    can_halt = False

    def forward(self, h: Tensor, iteration: int, active: Tensor, tokens: Tensor, positions: Tensor) -> GateDecision:
        return GateDecision(scores=None, active=active)
