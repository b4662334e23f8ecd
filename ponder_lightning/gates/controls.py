"""Counterfactual gates for evaluation: the same model and weights, one thing changed.

Each wraps a trained gate and keeps its scores s (so the feedback weights a continuing token gets
are the ones it was trained with); only *which* tokens halt changes:

- `FullDepth`: no token halts (tau = 0). Perplexity here vs at the learned depth shows whether
  the passes the gate skips (or keeps at s ~ 0) still matter.
- `FirstPassOnly`: every token halts after the first pass; its NLL measures a token's difficulty
  before any pondering, independently of the depth the gate gives it.
- `AtThreshold`: the gate's scores with another halting threshold (a tau sweep).
- `MatchedRandomPruning`: random halting that follows the learned gate's per-iteration active
  fractions: the fair iso-FLOPs control on the same weights (only the choice of tokens differs).

None of them has parameters of its own: they are built at evaluation time and never saved.
"""

from __future__ import annotations

import itertools

from torch import Tensor

from ponder_lightning.gates.base import halt_below
from ponder_lightning.gates.fixed import token_uniform
from ponder_lightning.nn.gate import Gate, GateDecision
from ponder_lightning.validation import ClosedUnitInterval, NonNegativeInt, check_init_args


class GateControl(Gate):
    """A trained gate with its halting rule replaced (see `halt`)."""

    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self.base = gate
        self.n_decisions = getattr(gate, "n_decisions", 0)

    def forward(self, h: Tensor, iteration: int, active: Tensor, tokens: Tensor, positions: Tensor) -> GateDecision:
        decision = self.base(h, iteration, active, tokens, positions)
        return GateDecision(scores=decision.scores, active=self.halt(decision, iteration, active, tokens, positions))

    def halt(self, decision: GateDecision, iteration: int, active: Tensor, tokens: Tensor, positions: Tensor) -> Tensor:
        raise NotImplementedError

    def feedback_scale(self, scores: Tensor) -> Tensor:
        return self.base.feedback_scale(scores)

    def extra_flops_per_token(self, d_model: int) -> float:
        return self.base.extra_flops_per_token(d_model)


class FullDepth(GateControl):
    """Every token runs every iteration, fed back with the trained gate's scores."""

    def halt(self, decision: GateDecision, iteration: int, active: Tensor, tokens: Tensor, positions: Tensor) -> Tensor:
        return active


class FirstPassOnly(GateControl):
    """Every token halts after the first pass (the readout is the first pass's)."""

    def halt(self, decision: GateDecision, iteration: int, active: Tensor, tokens: Tensor, positions: Tensor) -> Tensor:
        return active & False


class AtThreshold(GateControl):
    """The trained gate's scores, halting below `tau` instead of the gate's own rule."""

    def __init__(self, gate: Gate, tau: ClosedUnitInterval) -> None:
        check_init_args(AtThreshold, locals())
        super().__init__(gate)
        self.tau = tau

    def halt(self, decision: GateDecision, iteration: int, active: Tensor, tokens: Tensor, positions: Tensor) -> Tensor:
        if decision.scores is None:
            raise ValueError(f"{type(self.base).__name__} has no scores to threshold")
        return halt_below(decision.scores, active, self.tau)


class MatchedRandomPruning(GateControl):
    """Halts tokens at random so that iteration i runs for `active_fractions[i]` of the tokens in
    expectation (the learned gate's profile), keeping the learned scores as feedback weights.

    Draws are a deterministic hash of (token id, position, iteration, seed), as in
    `FixedRatioGate`, so the choice never looks ahead and decoding prunes what evaluation does.
    """

    def __init__(self, gate: Gate, active_fractions: list[ClosedUnitInterval], seed: NonNegativeInt = 0) -> None:
        check_init_args(MatchedRandomPruning, locals())
        super().__init__(gate)
        if not active_fractions or active_fractions[0] <= 0:
            raise ValueError(f"active_fractions must start with a positive fraction, got {active_fractions}")
        self.seed = seed
        self.halt_probs = [
            min(max(1.0 - after / before, 0.0), 1.0) if before > 0 else 1.0
            for before, after in itertools.pairwise(active_fractions)
        ]

    def halt(self, decision: GateDecision, iteration: int, active: Tensor, tokens: Tensor, positions: Tensor) -> Tensor:
        draws = token_uniform(tokens, positions, iteration, self.seed)
        return active & (draws >= self.halt_probs[iteration])
