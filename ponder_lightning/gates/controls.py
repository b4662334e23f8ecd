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
- `OracleDepth`, `ReadoutAtNeed`, `RecordingReadouts`: on a synthetic task, each token halted
  (or read) after the passes its label needs, and every pass's readout kept (the depth map).

The gate study's rankings and probes (`research/controls.py`) build on these.

None of them has parameters of its own: they are built at evaluation time and never saved.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from ponder_lightning.gates.base import halt_below
from ponder_lightning.gates.fixed import token_uniform
from ponder_lightning.nn.gate import Gate, GateDecision
from ponder_lightning.validation import ClosedUnitInterval, NonNegativeInt, check_init_args

#: Offset of the evaluation draws' seeds from the training gates' (`MatchedRandomPruning`).
DRAW_STREAM = 1_000_003


class GateControl(Gate):
    """A trained gate with its halting rule replaced (see `halt`)."""

    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self.base = gate

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
    They come from a stream of their own (`DRAW_STREAM` apart from any gate's seed): a model
    trained with `FixedRatioGate(seed=0)` has adapted to that gate's draws, and the same draws
    here would hand it back its own training mask instead of a random one.
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
        draws = token_uniform(tokens, positions, iteration, DRAW_STREAM + self.seed)
        return active & (draws >= self.halt_probs[iteration])


class OracleDepth(GateControl):
    """Halts each token once it has run the number of passes it is known to need: the mechanism
    check of adaptive depth with no gate learning (on a synthetic task whose tokens' steps are
    known by construction, `data.synthetic.passes_needed`). If the model's passes do what they
    are meant to, accuracy here equals full depth's at the oracle's FLOPs; if it does not, KV
    reuse (halted tokens are attended with the K/V of their last pass), the readout or the
    feedback is wrong for halted tokens' neighbours. Continuing tokens keep the wrapped gate's
    feedback weights (weight 1 for a model without a gate).

    `needs` [B, T] (passes, >= 1) belongs to one batch, indexed by row and rotary position; the
    caller sets it before each forward. A gate sees no row identity when decoding, so decode one
    sequence at a time (`needs` [1, T]).
    """

    def __init__(self, gate: Gate) -> None:
        super().__init__(gate)
        self.needs: Tensor | None = None

    def halt(self, decision: GateDecision, iteration: int, active: Tensor, tokens: Tensor, positions: Tensor) -> Tensor:
        if self.needs is None or self.needs.shape[0] != active.shape[0]:
            raise ValueError(
                f"OracleDepth needs passes per token for all {active.shape[0]} rows set before each forward "
                f"(got {None if self.needs is None else tuple(self.needs.shape)}); decode one sequence at a time"
            )
        needs = self.needs.to(positions.device).gather(1, positions.long())
        return active & (needs > iteration + 1)


class RecordingReadouts(GateControl):
    """The wrapped gate, unchanged, keeping what each decision saw: the readout of the pass just
    run ([B, T, d] per decision, from the forward now running; the scores are in the trace). With
    the forward's output it is every pass's readout (`depth_map.pass_report`, `ReadoutAtNeed`)."""

    def __init__(self, gate: Gate) -> None:
        super().__init__(gate)
        self.readouts: list[Tensor] = []

    @property
    def can_halt(self) -> bool:  # type: ignore[override]
        return self.base.can_halt

    def forward(self, h: Tensor, iteration: int, active: Tensor, tokens: Tensor, positions: Tensor) -> GateDecision:
        if iteration == 0:
            self.readouts = []
        self.readouts.append(h.detach())
        return super().forward(h, iteration, active, tokens, positions)

    def halt(self, decision: GateDecision, iteration: int, active: Tensor, tokens: Tensor, positions: Tensor) -> Tensor:
        return decision.active

    def passes(self, out: Tensor) -> Tensor:
        """Every pass's readout [B, T, n_iterations, d]: the recorded ones, then `out` (the
        forward's output, which is the last pass's readout wherever that pass ran)."""
        return torch.stack([*self.readouts, out], dim=2)


class ReadoutAtNeed(RecordingReadouts):
    """Every token runs every pass (no halting, so no K/V is reused), but a token's output is read
    from the pass its label needs (`needs` [B, T], set before each forward like `OracleDepth`'s):
    with `OracleDepth` and full depth it splits what halting costs into the readout (is the
    needed pass's output a prediction at all?) and KV reuse (do later passes of other tokens
    miss this token's later K/V?). `pick(out)` gives the chosen readouts after the forward."""

    def __init__(self, gate: Gate) -> None:
        super().__init__(FullDepth(gate))
        self.needs: Tensor | None = None

    def pick(self, out: Tensor) -> Tensor:
        if self.needs is None or self.needs.shape != out.shape[:2]:
            raise ValueError(
                f"ReadoutAtNeed needs passes per token of shape {tuple(out.shape[:2])} set before each forward"
            )
        passes = self.passes(out)
        index = (self.needs.to(out.device).clamp(1, passes.shape[2]) - 1).long()
        return passes.gather(2, index[..., None, None].expand(*index.shape, 1, out.shape[-1])).squeeze(2)
