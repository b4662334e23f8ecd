"""Random pruning at fixed per-iteration ratios: the iso-FLOPs baseline for learned gates."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from ponder_lightning.errors import UserError
from ponder_lightning.nn.gate import Gate, GateDecision
from ponder_lightning.validation import AtLeastOneFloat, NonNegativeInt, check_init_args


def active_fractions(schedule: str, n_iterations: int, target_depth: float) -> list[float]:
    """Fraction of tokens running each iteration (the first is 1) with mean depth `target_depth`.

    uniform: the fraction falls by the same amount every iteration; geometric: by the same factor.
    """
    if not 1.0 <= target_depth <= n_iterations:
        raise ValueError(f"target_depth must be within [1, {n_iterations}], got {target_depth}")
    if schedule == "uniform":
        if n_iterations > 1 and target_depth < (n_iterations + 1) / 2:
            raise ValueError(
                f"a uniform schedule over {n_iterations} iterations reaches mean depth "
                f"{(n_iterations + 1) / 2} at the least (its last iteration would need a "
                f"negative active fraction for {target_depth}): use schedule 'geometric'"
            )
        step = 2 * (n_iterations - target_depth) / (n_iterations * (n_iterations - 1)) if n_iterations > 1 else 0.0
        return [1.0 - i * step for i in range(n_iterations)]
    if schedule == "geometric":
        lo, hi = 0.0, 1.0
        for _ in range(100):  # bisection on q: sum_i q^i = target_depth
            q = (lo + hi) / 2
            lo, hi = (q, hi) if sum(q**i for i in range(n_iterations)) < target_depth else (lo, q)
        return [q**i for i in range(n_iterations)]
    raise ValueError(f"unknown schedule {schedule!r}: use 'uniform' or 'geometric'")


def token_uniform(tokens: Tensor, positions: Tensor, iteration: int, seed: int) -> Tensor:
    """A deterministic pseudo-random number in [0, 1) per (token id, position, iteration, seed).

    It depends on nothing else, so teacher-forced evaluation and step-by-step decoding prune the
    same tokens, and no token's draw depends on the future.
    """
    x = tokens.long() * 0x9E3779B1 + positions.long() * 0x85EBCA77 + (iteration + 1) * 0xC2B2AE3D + seed * 0x27D4EB2F
    for _ in range(3):  # integer mixing in 31-bit arithmetic (int64 never overflows here)
        x = (x ^ (x >> 15)) & 0x7FFFFFFF
        x = (x * 0x2C1B3C6D) & 0x7FFFFFFF
    return x.double().div(2**31).float()


class FixedRatioGate(Gate):
    """Halts a fixed fraction of the still-active tokens at each iteration, chosen at random.

    Args:
        target_depth: mean number of iterations per token (e.g. 3.7 of 4), matched to a learned gate.
        schedule: 'uniform' (active fraction falls linearly) or 'geometric' (by a constant factor).
        seed: seed of the per-token random draws.
    """

    def __init__(
        self,
        target_depth: AtLeastOneFloat = 3.7,
        schedule: Literal["uniform", "geometric"] = "uniform",
        seed: NonNegativeInt = 0,
    ) -> None:
        check_init_args(FixedRatioGate, locals())
        super().__init__()
        self.target_depth, self.schedule, self.seed = target_depth, schedule, seed

    def bind(self, d_model: int, n_decisions: int) -> None:
        super().bind(d_model, n_decisions)
        try:
            fractions = active_fractions(self.schedule, n_decisions + 1, self.target_depth)
        except ValueError as exc:  # the range depends on the model's iterations, known only here
            raise UserError(f"FixedRatioGate target_depth={self.target_depth}: {exc}") from None
        # Probability that a token active at iteration i halts before i+1.
        self.halt_probs = [
            1.0 - fractions[i + 1] / fractions[i] if fractions[i] > 0 else 1.0 for i in range(n_decisions)
        ]

    def forward(self, h: Tensor, iteration: int, active: Tensor, tokens: Tensor, positions: Tensor) -> GateDecision:
        draws = token_uniform(tokens, positions, iteration, self.seed)
        return GateDecision(scores=None, active=active & (draws >= self.halt_probs[iteration]))
