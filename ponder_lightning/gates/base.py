"""The gate interface: after iteration i, decide which tokens run iteration i+1.

Gates are built in two steps: the YAML (or Python) constructs one with its hyper-parameters only,
and the model calls `bind(d_model, n_decisions)` to create the parameters, so that a gate can be
swapped from a config overlay without repeating the model's sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ponder_lightning.nn.packed import Linear


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


def halt_below(scores: Tensor, active: Tensor, threshold: float | Tensor) -> Tensor:
    """Monotone halting: a token stays active only while it was active and its score >= threshold."""
    return active & (scores >= threshold)


def mlp_scorer(d_model: int, hidden_mult: int, init_bias: float) -> nn.Sequential:
    """d -> hidden_mult*d -> 1 with GELU; the last bias starts at `init_bias` so that sigmoid
    scores begin near 'continue' (sigmoid(2) = 0.88) and nothing halts before the gate learns."""
    mlp = nn.Sequential(Linear(d_model, hidden_mult * d_model), nn.GELU(), Linear(hidden_mult * d_model, 1))
    with torch.no_grad():
        mlp[2].bias.fill_(init_bias)
    return mlp


def mlp_flops(d_model: int, hidden_mult: int) -> float:
    return 2.0 * (d_model * hidden_mult * d_model + hidden_mult * d_model)
