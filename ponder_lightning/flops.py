"""Analytic FLOPs per token, counting a multiply-add as 2 FLOPs (the PaLM/Chinchilla convention).

Everything is expressed per token so that pondering models can scale each part by the fraction of
tokens that actually ran it; "x vanilla" figures divide by `vanilla_forward_flops`.
"""

from __future__ import annotations

from ponder_lightning.nn.config import BackboneConfig


def stack_flops(cfg: BackboneConfig, context: int) -> float:
    """One pass of the decoder layers for one token attending over `context` keys."""
    d = cfg.d_model
    mlp_matrices = 3 if cfg.block == "llama" else 2  # SwiGLU: gate, up, down
    dense = 2 * (3 * d * d + d * d + mlp_matrices * d * cfg.d_ff)  # qkv, attention out, MLP
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


def recurrent_forward_flops(
    cfg: BackboneConfig, context: int, active_fractions: list[float], feedback_flops: float, gate_flops: float
) -> dict[str, float]:
    """Inference FLOPs per token of a recurrent model at the depth it actually ran.

    `active_fractions[i]` = fraction of tokens that ran iteration i (the first is 1). A token that
    continues into iteration i first pays for the feedback (e.g. the pondering mixture, LM head
    included); every decision costs the gate; the final LM head runs once per token.
    Returns multiples of one vanilla forward: `x_vanilla` (total), `passes` (1 + sum of the later
    iterations' active fractions, the paper's headline figure), and the feedback and gate shares.
    """
    unit = vanilla_forward_flops(cfg, context)
    passes = float(sum(active_fractions))
    feedback = feedback_flops * sum(active_fractions[1:])
    gates = gate_flops * sum(active_fractions[:-1]) if len(active_fractions) > 1 else 0.0
    total = stack_flops(cfg, context) * passes + head_flops(cfg) + feedback + gates
    return {
        "x_vanilla": total / unit,
        "passes": passes,
        "feedback_x_vanilla": feedback / unit,
        "gate_x_vanilla": gates / unit,
    }


def slot_forward_flops(
    cfg: BackboneConfig, context: int, slot_fractions: list[float], router_flops: float = 0.0
) -> dict[str, float]:
    """Inference FLOPs per token of a latent-slot model (PonderLM-2/3): sum_t (1 + steps_t)
    slot-forwards, i.e. `slot_fractions[k]` = fraction of tokens that ran slot k (the token slot:
    1). The KV cache holds that many slots per token, so attention spans `context` x slots keys.
    The router runs once per token; the LM head once. Same keys as `recurrent_forward_flops`
    (`passes` = slot-forwards per token; latent feedback costs nothing)."""
    unit = vanilla_forward_flops(cfg, context)
    slots = float(sum(slot_fractions))
    total = stack_flops(cfg, context * slots) * slots + head_flops(cfg) + router_flops
    return {
        "x_vanilla": total / unit,
        "passes": slots,
        "feedback_x_vanilla": 0.0,
        "gate_x_vanilla": router_flops / unit,
    }


def latent_training_forward_flops(
    cfg: BackboneConfig, context: int, latent_steps: int, jacobi_passes: float, router_flops: float = 0.0
) -> float:
    """Forward FLOPs per token of one latent-slot training step: build-up passes over 1..K slots
    per token, then J Jacobi passes and a final pass over K+1 slots (about (3 + 2J) x vanilla for
    K = 1), the router after every pass but the last, the LM head once."""
    full = latent_steps + 1
    build_up = sum(w * stack_flops(cfg, context * w) for w in range(1, full))
    jacobi = (jacobi_passes + 1) * full * stack_flops(cfg, context * full)
    return build_up + jacobi + head_flops(cfg) + router_flops * (latent_steps + jacobi_passes)


def format_flops_table(model_name: str, context: int, rows: list[tuple[list[float], dict[str, float]]]) -> str:
    """Markdown table of inference FLOPs per token (x vanilla) for several depth profiles."""
    lines = [
        f"{model_name}, context {context} tokens; FLOPs per token as multiples of one vanilla forward",
        "| active fraction per iteration | passes | feedback | gates | total x vanilla |",
        "|---|---|---|---|---|",
    ]
    for fractions, result in rows:
        profile = ", ".join(f"{f:.3g}" for f in fractions)
        lines.append(
            f"| {profile} | {result['passes']:.3f} | {result['feedback_x_vanilla']:.3f} | "
            f"{result['gate_x_vanilla']:.4f} | {result['x_vanilla']:.3f} |"
        )
    return "\n".join(lines)
