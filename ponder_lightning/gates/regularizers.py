"""Compute regularisers on gate scores, separate from the gates so either can be swapped."""

from __future__ import annotations

import torch
from torch import Tensor


class PonderRegularizer:
    """Maps the gate scores and active masks of a forward pass (and the optimizer step) to a loss."""

    def __call__(self, scores: list[Tensor | None], active: list[Tensor], step: int) -> Tensor | None:
        raise NotImplementedError


class NoPonderLoss(PonderRegularizer):
    """CE only (PonderLM, LoopTransformer, or an AdaPonderLM ablation)."""

    def __call__(self, scores: list[Tensor | None], active: list[Tensor], step: int) -> Tensor | None:
        return None


class BottomKPonderLoss(PonderRegularizer):
    """AdaPonderLM's ponder loss: lam * mean of the smallest k-fraction of the gate scores over all
    (token, iteration) entries that were active (padding never is). Pushing the lowest scores
    towards 0 is what makes tokens cross tau and halt.

    k ramps linearly from 0 at `start_step` to `k_max` at `start_step + ramp_steps`; before
    `start_step` the loss is 0 (the paper's CE-only first stage).

    Args:
        lam: weight of the loss (paper default 0.1).
        k_max: final fraction of entries penalised (paper default 0.1).
        start_step: optimizer step at which the ramp starts.
        ramp_steps: length of the linear ramp in steps.
    """

    def __init__(self, lam: float = 0.1, k_max: float = 0.1, start_step: int = 0, ramp_steps: int = 1000) -> None:
        self.lam, self.k_max, self.start_step, self.ramp_steps = lam, k_max, start_step, ramp_steps

    def k_at(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        return self.k_max * min(1.0, (step - self.start_step) / max(self.ramp_steps, 1))

    def __call__(self, scores: list[Tensor | None], active: list[Tensor], step: int) -> Tensor | None:
        entries = [s[a] for s, a in zip(scores, active) if s is not None]
        if not entries:
            return None
        values = torch.cat(entries)
        k = int(self.k_at(step) * values.numel())
        if k == 0:
            return values.sum() * 0.0  # keeps the graph (and DDP's used-parameter set) identical
        return self.lam * values.topk(k, largest=False).values.mean()
