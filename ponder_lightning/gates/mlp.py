"""Learned sigmoid gates (AdaPonderLM): halt a token once its score falls below tau."""

from __future__ import annotations

from torch import Tensor, nn

from ponder_lightning.gates.base import Gate, GateDecision, halt_below, mlp_flops, mlp_scorer


class PerIterationMLPGate(Gate):
    """AdaPonderLM's gate: one 2-layer MLP per iteration, s = sigmoid(MLP_i(h)), halt when s < tau.

    Args:
        hidden_mult: MLP width as a multiple of d_model (d -> hidden_mult*d -> 1).
        init_bias: initial bias of the last layer; positive starts every token near 'continue'.
        tau: halting threshold (paper: 1e-4).
    """

    def __init__(self, hidden_mult: int = 4, init_bias: float = 2.0, tau: float = 1e-4) -> None:
        super().__init__()
        self.hidden_mult, self.init_bias, self.tau = hidden_mult, init_bias, tau

    def bind(self, d_model: int, n_decisions: int) -> None:
        super().bind(d_model, n_decisions)
        self.mlps = nn.ModuleList(mlp_scorer(d_model, self.hidden_mult, self.init_bias) for _ in range(n_decisions))

    def scorer(self, iteration: int) -> nn.Module:
        return self.mlps[iteration]

    def forward(self, h: Tensor, iteration: int, active: Tensor, tokens: Tensor, positions: Tensor) -> GateDecision:
        scores = self.scorer(iteration)(h).squeeze(-1).float().sigmoid()
        return GateDecision(scores=scores, active=halt_below(scores, active, self.tau))

    def extra_flops_per_token(self, d_model: int) -> float:
        return mlp_flops(d_model, self.hidden_mult)


class SingleMLPGate(PerIterationMLPGate):
    """Ablation: one MLP shared by all iterations (the paper reports it collapses)."""

    def bind(self, d_model: int, n_decisions: int) -> None:
        Gate.bind(self, d_model, n_decisions)
        self.mlp = mlp_scorer(d_model, self.hidden_mult, self.init_bias)

    def scorer(self, iteration: int) -> nn.Module:
        return self.mlp
