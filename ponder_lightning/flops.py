"""Analytic FLOPs per token, counting a multiply-add as 2 FLOPs (the PaLM/Chinchilla convention).

Everything is expressed per token so that pondering models can scale each part by the fraction of
tokens that actually ran it; "x vanilla" figures divide by `vanilla_forward_flops`.
"""

from __future__ import annotations

from ponder_lightning.nn.config import BackboneConfig


def stack_flops(cfg: BackboneConfig, context: int) -> float:
    """One pass of the decoder layers for one token attending over `context` keys."""
    d = cfg.d_model
    dense = 2 * (3 * d * d + d * d + 2 * d * cfg.d_ff)  # qkv, attention out, MLP in + out
    attention = 2 * 2 * d * context  # QK^T and AV
    return cfg.n_layer * (dense + attention)


def head_flops(cfg: BackboneConfig) -> float:
    """The LM head (the input embedding is a lookup and costs nothing)."""
    return 2 * cfg.d_model * cfg.vocab_size


def vanilla_forward_flops(cfg: BackboneConfig, context: int) -> float:
    """One vanilla forward per token: the unit of every 'x vanilla' figure."""
    return stack_flops(cfg, context) + head_flops(cfg)


def training_flops(forward_flops: float) -> float:
    """Forward + backward (the backward costs twice the forward)."""
    return 3 * forward_flops
