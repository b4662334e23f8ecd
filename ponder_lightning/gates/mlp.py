"""Learned sigmoid gates (AdaPonderLM): halt a token once its score falls below tau."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from ponder_lightning.gates.base import halt_below, mlp_flops, mlp_scorer
from ponder_lightning.nn.gate import Gate, GateDecision
from ponder_lightning.validation import ClosedUnitInterval, FiniteFloat, PositiveInt, check_init_args

FeedbackScale = Literal["score", "straight_through"]


class PerIterationMLPGate(Gate):
    """AdaPonderLM's gate: one 2-layer MLP per iteration, s = sigmoid(MLP_i(h)), halt when s < tau.

    Args:
        hidden_mult: MLP width as a multiple of d_model (d -> hidden_mult*d -> 1).
        init_bias: initial bias of the last layer; positive starts every token near 'continue'.
        tau: halting threshold (paper: 1e-4).
        feedback: how s scales the feedback of a token that goes on. 'score' (the paper):
            E += s * e, so a token whose score sits just above tau runs a pass whose input barely
            changed (a dead pass, the collapse the ablation tools show). 'straight_through'
            [ours]: E += e as in PonderLM (the value of s is 1) while the gradient still reaches
            s, so every pass a token runs is a real pondering step and CE tells the gate how much
            that step helps.
    """

    def __init__(
        self,
        hidden_mult: PositiveInt = 4,
        init_bias: FiniteFloat = 2.0,
        tau: ClosedUnitInterval = 1e-4,
        feedback: FeedbackScale = "score",
    ) -> None:
        check_init_args(PerIterationMLPGate, locals())
        super().__init__()
        if feedback not in ("score", "straight_through"):
            raise ValueError(f"gate feedback must be 'score' or 'straight_through', got {feedback!r}")
        self.hidden_mult, self.init_bias, self.tau, self.feedback = hidden_mult, init_bias, tau, feedback

    def bind(self, d_model: int, n_decisions: int) -> None:
        super().bind(d_model, n_decisions)
        self.mlps = nn.ModuleList(mlp_scorer(d_model, self.hidden_mult, self.init_bias) for _ in range(n_decisions))

    def scorer(self, iteration: int) -> nn.Module:
        return self.mlps[iteration]

    def forward(self, h: Tensor, iteration: int, active: Tensor, tokens: Tensor, positions: Tensor) -> GateDecision:
        scores = self.scorer(iteration)(h).squeeze(-1).float().sigmoid()
        return GateDecision(scores=scores, active=halt_below(scores, active, self.tau))

    def feedback_scale(self, scores: Tensor) -> Tensor:
        if self.feedback == "straight_through":
            return scores - scores.detach() + 1.0
        return scores

    def extra_flops_per_token(self, d_model: int) -> float:
        return mlp_flops(d_model, self.hidden_mult)


class SingleMLPGate(PerIterationMLPGate):
    """Ablation: one MLP shared by all iterations (the paper reports it collapses)."""

    def bind(self, d_model: int, n_decisions: int) -> None:
        Gate.bind(self, d_model, n_decisions)
        self.mlp = mlp_scorer(d_model, self.hidden_mult, self.init_bias)

    def scorer(self, iteration: int) -> nn.Module:
        return self.mlp
