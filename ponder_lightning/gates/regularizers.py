"""Compute regularisers on gate scores, separate from the gates so either can be swapped."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ponder_lightning.validation import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, check_init_args

#: log(1e4): the log-score operand maps s = 1 to 1 and s = 1e-4 (the paper's tau) to 0.
LOG_SCORE_SCALE = math.log(1e4)


class PonderRegularizer:
    """Maps the gate scores of a forward pass (and the optimizer step) to a loss.

    `scores[i]` and `active[i]` belong to decision i (the tokens that ran iteration i);
    `continuing[i]` (optional) is the mask of the tokens that went on to iteration i+1.
    """

    def __call__(self, scores: list[Tensor | None], active: list[Tensor], step: int, continuing: list[Tensor] | None = None) -> Tensor | None:
        raise NotImplementedError

    def describe(self, scores: list[Tensor | None], active: list[Tensor], step: int, continuing: list[Tensor] | None = None) -> dict[str, float]:
        """Statistics of what the loss acts on, for TensorBoard (empty when it acts on nothing)."""
        return {}


class NoPonderLoss(PonderRegularizer):
    """CE only (PonderLM, LoopTransformer, or an AdaPonderLM ablation)."""

    def __call__(self, scores: list[Tensor | None], active: list[Tensor], step: int, continuing: list[Tensor] | None = None) -> Tensor | None:
        return None


class BottomKPonderLoss(PonderRegularizer):
    """AdaPonderLM's ponder loss: lam * mean over the smallest k-fraction of the gate scores among
    all (token, iteration) entries that were active (padding never is). Pushing the lowest scores
    towards 0 is what makes tokens cross tau and halt.

    k ramps linearly from 0 at `start_step` to `k_max` at `start_step + ramp_steps`; before
    `start_step` the loss is 0 (the paper's CE-only first stage).

    Args:
        lam: weight of the loss (paper default 0.1).
        k_max: final fraction of entries penalised (paper default 0.1).
        start_step: optimizer step at which the ramp starts.
        ramp_steps: length of the linear ramp in steps.
        operand: what is averaged over the bottom-k entries. 'score' (the paper): s itself. Its
            gradient through the sigmoid vanishes as s -> 0, so the selected scores settle just
            above tau: the loss is nearly satisfied, nothing halts, and the passes those tokens
            still run are fed back with weight s ~ 0. 'log_score' [ours]: 1 + log(s) / log(1e4)
            for an entry that went on and 0 for one that halted there: a constant push in logit
            space until the entry halts, then none, so the loss is satisfied only by halting.
    """

    def __init__(
        self,
        lam: NonNegativeFloat = 0.1,
        k_max: ClosedUnitInterval = 0.1,
        start_step: NonNegativeInt = 0,
        ramp_steps: NonNegativeInt = 1000,
        operand: Literal["score", "log_score"] = "score",
    ) -> None:
        check_init_args(BottomKPonderLoss, locals())
        if operand not in ("score", "log_score"):
            raise ValueError(f"BottomKPonderLoss operand must be 'score' or 'log_score', got {operand!r}")
        self.lam, self.k_max, self.start_step, self.ramp_steps, self.operand = lam, k_max, start_step, ramp_steps, operand

    def k_at(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        return self.k_max * min(1.0, (step - self.start_step) / max(self.ramp_steps, 1))

    def _bottom_k(
        self, scores: list[Tensor | None], active: list[Tensor], step: int, continuing: list[Tensor] | None
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """Scores of the active entries, whether each went on, and the indices of the bottom k."""
        pairs = [(i, s, a) for i, (s, a) in enumerate(zip(scores, active)) if s is not None]
        if not pairs:
            return None
        values = torch.cat([s[a] for _, s, a in pairs])
        if continuing is None:
            went_on = torch.ones_like(values, dtype=torch.bool)
        else:
            went_on = torch.cat([continuing[i][a] for i, _, a in pairs])
        k = int(self.k_at(step) * values.numel())
        chosen = values.detach().topk(k, largest=False).indices if k else values.new_zeros(0, dtype=torch.long)
        return values, went_on, chosen

    def __call__(self, scores: list[Tensor | None], active: list[Tensor], step: int, continuing: list[Tensor] | None = None) -> Tensor | None:
        selection = self._bottom_k(scores, active, step, continuing)
        if selection is None:
            return None
        values, went_on, chosen = selection
        if chosen.numel() == 0:
            return values.sum() * 0.0  # keeps the graph (and DDP's used-parameter set) identical
        picked = values[chosen]
        if self.operand == "log_score":
            picked = (1 + picked.clamp_min(1e-30).log() / LOG_SCORE_SCALE) * went_on[chosen]
        return self.lam * picked.mean()

    @torch.no_grad()
    def describe(self, scores: list[Tensor | None], active: list[Tensor], step: int, continuing: list[Tensor] | None = None) -> dict[str, float]:
        """The loss's active set: its size (k), the highest score in it, and the fraction of it
        that still went on (0 = the loss only sees tokens that halted already)."""
        selection = self._bottom_k(scores, active, step, continuing)
        if selection is None or selection[2].numel() == 0:
            return {}
        values, went_on, chosen = selection
        return {
            "k": float(self.k_at(step)),
            "cutoff_score": float(values[chosen].max()),
            "went_on_fraction": float(went_on[chosen].float().mean()),
        }
