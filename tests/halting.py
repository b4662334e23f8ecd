"""The one way tests make random gates halt tokens: a large, input-dependent last layer with a
negative bias on every gate MLP, so that a sizeable, varying share of tokens scores below the
gate's tau at every decision (and the rest a spread of scores), and depths 1..n all occur."""

from __future__ import annotations

import torch

from ponder_lightning.nn.gate import Gate


def gate_mlps(gate: Gate | None) -> list[torch.nn.Sequential]:
    """The scoring MLPs of a gate: one per decision (`PerIterationMLPGate`), one shared
    (`SingleMLPGate`), or none (gates without scores)."""
    if hasattr(gate, "mlps"):
        return list(gate.mlps)
    return [gate.mlp] if hasattr(gate, "mlp") else []


def make_gates_halt(model, weight_std: float = 2.0, bias: float = -3.0, seed: int | None = None):
    """Make `model`'s gates halt (see the module docstring); `seed` draws the weights from a
    generator of their own instead of torch's global one. Returns the model."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mlp in gate_mlps(model.gate):
            last = mlp[2]
            last.weight.copy_(torch.randn(last.weight.shape, generator=generator) * weight_std)
            last.bias.fill_(bias)
        if hasattr(model.gate, "thresholds"):  # BottomKGate: a fixed threshold, as if trained
            model.gate.thresholds.fill_(0.5)
            model.gate.thresholds_seen.fill_(True)
    return model
