"""The trained control of *which* tokens halt: a learned gate whose halting mask is shuffled.

AdaPonderLM's gate does two things at once: its scores s scale the feedback of the tokens that
go on, and its threshold picks the tokens that halt. A control that halts tokens at random but
feeds back at weight 1 (`FixedRatioGate`) changes the feedback too, and the per-iteration profile,
and the gate's cost. `ShuffledHalting` changes one thing: it runs the same learned gate, trained
by the same loss, feeds continuing tokens back with the same s, and at each decision halts exactly
as many tokens as the gate would have, but chosen at random among the active ones. If AdaPonderLM
beats it at the same budget, the gate's choice of tokens is what helps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ponder_lightning.gates.controls import GateControl
from ponder_lightning.gates.fixed import token_uniform
from ponder_lightning.nn.gate import Gate, GateDecision
from ponder_lightning.validation import NonNegativeInt, check_init_args


class ShuffledHalting(GateControl):
    """`gate`'s scores and its number of halting tokens per decision (over the batch), with the
    halting tokens drawn at random (a deterministic hash of token id, position and iteration, as
    `FixedRatioGate` draws). When the draws pick the gate's own tokens (e.g. it halts none, or
    all), the forward is the gate's. The count is taken over the tokens a call sees: the batch in
    training and teacher-forced evaluation; in row-wise decoding, the rows at that iteration.

    Args:
        gate: the learned gate (e.g. PerIterationMLPGate), trained as in AdaPonderLM.
        seed: seed of the draws.
    """

    def __init__(self, gate: Gate, seed: NonNegativeInt = 0) -> None:
        check_init_args(ShuffledHalting, locals())
        super().__init__(gate)
        self.seed = seed

    def bind(self, d_model: int, n_decisions: int) -> None:  # trained with the model: bound with it
        super().bind(d_model, n_decisions)
        self.base.bind(d_model, n_decisions)

    def halt(self, decision: GateDecision, iteration: int, active: Tensor, tokens: Tensor, positions: Tensor) -> Tensor:
        halting = int((active & ~decision.active).sum())
        if halting == 0:
            return decision.active
        draws = token_uniform(tokens, positions, iteration, self.seed).masked_fill(~active, torch.inf)
        shuffled = active.flatten().clone()
        shuffled[draws.flatten().topk(halting, largest=False).indices] = False
        return shuffled.view_as(active)
