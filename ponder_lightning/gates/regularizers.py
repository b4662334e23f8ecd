"""Compute regularisers on gate scores, separate from the gates so either can be swapped."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ponder_lightning.gates.collectives import distributed_world_size, gather_rows
from ponder_lightning.validation import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, check_init_args

#: log(1e4): the log-score operand maps s = 1 to 1 and s = 1e-4 (the paper's tau) to 0.
LOG_SCORE_SCALE = math.log(1e4)


class PonderRegularizer:
    """Maps the gate scores of a forward pass (and the optimizer step) to a loss.

    `scores[i]` and `active[i]` belong to decision i (the tokens that ran iteration i);
    `continuing[i]` (optional) is the mask of the tokens that went on to iteration i+1.
    """

    def __call__(
        self, scores: list[Tensor | None], active: list[Tensor], step: int, continuing: list[Tensor] | None = None
    ) -> Tensor | None:
        raise NotImplementedError

    def describe(
        self, scores: list[Tensor | None], active: list[Tensor], step: int, continuing: list[Tensor] | None = None
    ) -> dict[str, float]:
        """Statistics of what the loss acts on, for TensorBoard (empty when it acts on nothing)."""
        return {}


class NoPonderLoss(PonderRegularizer):
    """CE only (PonderLM, LoopTransformer, or an AdaPonderLM ablation)."""

    def __call__(
        self, scores: list[Tensor | None], active: list[Tensor], step: int, continuing: list[Tensor] | None = None
    ) -> Tensor | None:
        return None


class BottomKPonderLoss(PonderRegularizer):
    """AdaPonderLM's ponder loss: lam * mean over the smallest k-fraction of the gate scores among
    all (token, iteration) entries that were active (padding never is). Pushing the lowest scores
    towards 0 is what makes tokens cross tau and halt.

    k ramps linearly from 0 at `start_step` to `k_max` at `start_step + ramp_steps`; before
    `start_step` the loss is 0 (the paper's CE-only first stage).

    Across ranks (torch.distributed initialised, world size > 1) the loss is batch-global, equal
    to one process on the same global batch: every rank gathers the detached scores and masks of
    all ranks, assembles the global batch in the order one process has it (rank r holds the r-th
    contiguous slice) and selects the bottom k with the same code, so the entries chosen, ties
    included, are those one process chooses. Each rank then backpropagates
    `world_size * lam * (sum of its own chosen entries) / k`: DDP's and FSDP's mean over ranks of
    these gradients is the one-process gradient. The value a rank returns (and logs) is the
    one-process loss of the global batch; only its gradient is the rank's share.

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
        self.lam, self.k_max, self.start_step, self.ramp_steps, self.operand = (
            lam,
            k_max,
            start_step,
            ramp_steps,
            operand,
        )

    def k_at(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        if self.ramp_steps == 0:  # no ramp: k_max from start_step on
            return self.k_max
        return self.k_max * min(1.0, (step - self.start_step) / self.ramp_steps)

    def _bottom_k(
        self, scores: list[Tensor | None], active: list[Tensor], step: int, continuing: list[Tensor] | None
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """Scores of the active entries, whether each went on, and the indices of the bottom k."""
        entries = self._entries(scores, active, continuing)
        if entries is None:
            return None
        values, went_on = entries
        k = int(self.k_at(step) * values.numel())
        chosen = values.detach().topk(k, largest=False).indices if k else values.new_zeros(0, dtype=torch.long)
        return values, went_on, chosen

    @staticmethod
    def _entries(
        scores: list[Tensor | None], active: list[Tensor], continuing: list[Tensor] | None
    ) -> tuple[Tensor, Tensor] | None:
        """Scores of the active entries, decision by decision in row-major order, and whether each went on."""
        pairs = [(i, s, a) for i, (s, a) in enumerate(zip(scores, active, strict=True)) if s is not None]
        if not pairs:
            return None
        values = torch.cat([s[a] for _, s, a in pairs])
        if continuing is None:
            went_on = torch.ones_like(values, dtype=torch.bool)
        else:
            went_on = torch.cat([continuing[i][a] for i, _, a in pairs])
        return values, went_on

    def _operand(self, picked: Tensor, went_on: Tensor) -> Tensor:
        if self.operand == "log_score":
            return (1 + picked.clamp_min(1e-30).log() / LOG_SCORE_SCALE) * went_on
        return picked

    @staticmethod
    def _global_batch(
        scores: list[Tensor | None], active: list[Tensor], continuing: list[Tensor] | None
    ) -> tuple[list[Tensor | None], list[Tensor | None], list[Tensor | None] | None, int]:
        """The detached scores and masks of all ranks' rows (one collective), as one process has
        them, and the first global row of this rank. Decisions without scores stay None."""
        used = [i for i, (s, _) in enumerate(zip(scores, active, strict=True)) if s is not None]
        dtype = torch.promote_types(scores[used[0]].dtype, torch.float32)
        planes = []
        for i in used:
            went_on = active[i] if continuing is None else continuing[i]
            planes += [scores[i].detach().to(dtype), active[i].to(dtype), went_on.to(dtype)]
        packed, first = gather_rows(torch.stack(planes, dim=1))
        g_scores: list[Tensor | None] = [None] * len(scores)
        g_active: list[Tensor | None] = [None] * len(active)
        g_continuing: list[Tensor | None] = [None] * len(active)
        for j, i in enumerate(used):
            g_scores[i] = packed[:, 3 * j].to(scores[i].dtype)
            g_active[i] = packed[:, 3 * j + 1].bool()
            g_continuing[i] = packed[:, 3 * j + 2].bool()
        return g_scores, g_active, None if continuing is None else g_continuing, first

    def __call__(
        self, scores: list[Tensor | None], active: list[Tensor], step: int, continuing: list[Tensor] | None = None
    ) -> Tensor | None:
        world = distributed_world_size()
        if world > 1:
            return self._global_loss(scores, active, step, continuing, world)
        selection = self._bottom_k(scores, active, step, continuing)
        if selection is None:
            return None
        values, went_on, chosen = selection
        if chosen.numel() == 0:
            return values.sum() * 0.0  # keeps the graph (and DDP's used-parameter set) identical
        return self.lam * self._operand(values[chosen], went_on[chosen]).mean()

    def _global_loss(
        self, scores: list[Tensor | None], active: list[Tensor], step: int, continuing: list[Tensor] | None, world: int
    ) -> Tensor | None:
        """This rank's share of the loss of the global batch (see the class docstring)."""
        local = self._entries(scores, active, continuing)
        if local is None:
            return None
        values, went_on = local
        g_scores, g_active, g_continuing, first = self._global_batch(scores, active, continuing)
        g_values, g_went_on, chosen = self._bottom_k(g_scores, g_active, step, g_continuing)
        if chosen.numel() == 0:
            return values.sum() * 0.0
        # owner[j]: the index in `values` of global entry j when this rank holds it, else -1.
        owner, offset = [], 0
        for i, (s, a) in enumerate(zip(scores, active, strict=True)):
            if s is None:
                continue
            ids = torch.full_like(g_active[i], -1, dtype=torch.long)
            n = int(a.sum())
            ids[first : first + a.shape[0]][a] = torch.arange(offset, offset + n, device=a.device)
            owner.append(ids[g_active[i]])
            offset += n
        mine = torch.cat(owner)[chosen]
        mine = mine[mine >= 0]
        k = chosen.numel()
        share = world * self.lam * self._operand(values[mine], went_on[mine]).sum() / k
        total = self.lam * self._operand(g_values[chosen], g_went_on[chosen]).mean()  # what one process computes
        return share + (total - share).detach()

    @torch.no_grad()
    def describe(
        self, scores: list[Tensor | None], active: list[Tensor], step: int, continuing: list[Tensor] | None = None
    ) -> dict[str, float]:
        """The loss's active set: its size (k), the highest score in it, and the fraction of it
        that still went on (0 = the loss only sees tokens that halted already). Across ranks,
        those of the global batch (a collective, like the loss)."""
        if distributed_world_size() > 1 and any(s is not None for s in scores):
            scores, active, continuing, _ = self._global_batch(scores, active, continuing)
        selection = self._bottom_k(scores, active, step, continuing)
        if selection is None or selection[2].numel() == 0:
            return {}
        values, went_on, chosen = selection
        return {
            "k": float(self.k_at(step)),
            "cutoff_score": float(values[chosen].max()),
            "went_on_fraction": float(went_on[chosen].float().mean()),
        }
