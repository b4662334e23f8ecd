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
            for d, (s, c) in enumerate(zip(self.nll_sum.tolist(), self.count.tolist(), strict=True))
            if c > 0
        ]


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..n of a flat tensor, ties sharing the mean of their ranks (as Spearman needs)."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty(len(x), dtype=torch.float64, device=x.device)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64, device=x.device)
    _, groups = torch.unique(x, return_inverse=True)
    sums = torch.zeros(int(groups.max()) + 1 if len(x) else 0, dtype=torch.float64, device=x.device).index_add_(
        0, groups, ranks
    )
    counts = torch.bincount(groups).double()
    return (sums / counts)[groups]


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's rank correlation (NaN when either side is constant)."""
    rx, ry = average_ranks(x.flatten()), average_ranks(y.flatten())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.square().sum() * ry.square().sum()).sqrt()
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def depth_by_decile(difficulty: Tensor, depth: Tensor, bins: int = 10) -> list[dict[str, float]]:
    """Tokens sorted by difficulty and cut into `bins` equal groups (deciles by default), easiest
    first: each group's mean difficulty and mean depth."""
    order = torch.argsort(difficulty.flatten(), stable=True)
    rows = []
    for i, chunk in enumerate(torch.tensor_split(order, bins)):
        if chunk.numel():
            rows.append(
                {
                    "decile": i + 1,
                    "difficulty": float(difficulty.flatten()[chunk].double().mean()),
                    "depth": float(depth.flatten()[chunk].double().mean()),
                }
            )
    return rows


class DepthDifficulty(Metric):
    """Per-token depth next to difficulties measured independently of that depth (NLL at full
    depth and at the first pass, on the same weights), gathered across ranks for deciles and
    rank correlations at validation."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("depth", "nll_full_depth", "nll_first_pass"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, depth: Tensor, nll_full_depth: Tensor, nll_first_pass: Tensor) -> None:
        self.depth.append(depth.float())
        self.nll_full_depth.append(nll_full_depth.float())
        self.nll_first_pass.append(nll_first_pass.float())

    def compute(self) -> dict[str, Tensor]:
        return {
            name: torch.cat(v) if isinstance(v, list) else v
            for name, v in (
                ("depth", self.depth),
                ("nll_full_depth", self.nll_full_depth),
                ("nll_first_pass", self.nll_first_pass),
            )
        }
