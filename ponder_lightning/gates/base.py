"""What the gate implementations share: monotone halting and the MLP scorer (the protocol they
implement is `nn/gate.py`).

Gates are built in two steps: the YAML (or Python) constructs one with its hyper-parameters only,
and the model calls `bind(d_model, n_decisions)` to create the parameters, so that a gate can be
swapped from a config overlay without repeating the model's sizes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ponder_lightning.nn.onednn import Linear


def halt_below(scores: Tensor, active: Tensor, threshold: float | Tensor) -> Tensor:
    """Monotone halting: a token stays active only while it was active and its score >= threshold."""
    return active & (scores >= threshold)


def mlp_scorer(d_model: int, hidden_mult: int, init_bias: float) -> nn.Sequential:
    """d -> hidden_mult*d -> 1 with GELU; the last bias starts at `init_bias` so that sigmoid
    scores begin near 'continue' (sigmoid(2) = 0.88) and nothing halts before the gate learns."""
    mlp = nn.Sequential(Linear(d_model, hidden_mult * d_model), nn.GELU(), Linear(hidden_mult * d_model, 1))
    with torch.no_grad():
        mlp[2].bias.fill_(init_bias)
    return mlp


def mlp_flops(d_model: int, hidden_mult: int) -> float:
    return 2.0 * (d_model * hidden_mult * d_model + hidden_mult * d_model)
