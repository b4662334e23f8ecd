"""Validation metric: per-depth token counts and NLL sums, synchronised across ranks.

Everything reported at validation follows from this one histogram: loss (and ppl = exp(loss)),
mean depth, the fraction of tokens that ran each iteration, and the depth-vs-NLL table. It reuses
the per-token NLL already computed, instead of a second softmax (torchmetrics.Perplexity).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class DepthNLL(Metric):
    full_state_update = False

    def __init__(self, max_depth: int) -> None:
        super().__init__()
        self.add_state("nll_sum", default=torch.zeros(max_depth + 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(max_depth + 1, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nll: Tensor, depth: Tensor) -> None:
        """`nll` and `depth` of the counted (non-padding) tokens, flat."""
        depth = depth.long()
        self.nll_sum.index_add_(0, depth, nll.double())
        self.count.index_add_(0, depth, torch.ones_like(nll, dtype=torch.float64))

    def compute(self) -> dict[str, Tensor]:
        total = self.count.sum().clamp(min=1)
        depths = torch.arange(len(self.count), device=self.count.device, dtype=torch.float64)
        reached = self.count.flip(0).cumsum(0).flip(0)  # tokens with depth >= d
        return {
            "loss": (self.nll_sum.sum() / total).float(),
            "depth_mean": ((depths * self.count).sum() / total).float(),
            "active_fractions": (reached[1:] / total).float(),  # iteration i ran for depth > i
        }

    def table(self) -> list[tuple[int, int, float]]:
        """(depth, tokens, mean NLL) for every depth reached."""
        return [
            (d, int(c), s / c)
            for d, (s, c) in enumerate(zip(self.nll_sum.tolist(), self.count.tolist()))
            if c > 0
        ]
