"""The GPT-NeoX (Pythia) decoder, and a LLaMA-style block as a second block type, written so
that callers can intercept every layer's K and V.

Module names mirror transformers' `GPTNeoXForCausalLM` (minus the `gpt_neox.` prefix) so that
Pythia checkpoints load by name. Pondering models run this backbone several times per token; the
`kv_hook` lets them replace K/V before attention (KV alignment for halted tokens, per-iteration
decode caches) without a second copy of the attention code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ponder_lightning.nn.config import BackboneConfig
from ponder_lightning.nn.onednn import Linear
from ponder_lightning.nn.torch_internals import allow_compiled_graphs


@dataclass(frozen=True)
class ScatteredKV:
    """Keys and values that one-token decode queries read where they lie: query row j attends to
    `k[index[j]]` and `v[index[j]]` ([E, H, L, Dh] caches, the first T slots, T = the mask's key
    length). Row-wise decoding's rows sit at different iterations, so their caches are scattered
    over one flat cache; SDPA would need them copied into one tensor first (see
    `scattered_attention`)."""

    k: Tensor
    v: Tensor
    index: Tensor


class KVHook(Protocol):
    """Sees each layer's K and V (after rotary, shape [B, H, T, Dh]) and returns the ones to attend to.

    A hook may replace rows (halted tokens keep old K/V) or prepend cached keys (decoding); the
    attention mask passed to the backbone must then match the returned key length. A decode hook
    may instead point at cached keys in place (`ScatteredKV`). A hook may
    also offer `for_layer(i)`, the same hook bound to layer i as a `(k, v)` callable whose state
    is tensors, so that a compiled block sees no layer index (one graph for every layer).
    """

    def __call__(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor] | ScatteredKV: ...


#: the hook as one layer's block calls it
LayerKVHook = Callable[[Tensor, Tensor], tuple[Tensor, Tensor] | ScatteredKV]


def layer_hook(kv_hook: KVHook | None, layer: int) -> LayerKVHook | None:
    if kv_hook is None:
        return None
    for_layer = getattr(kv_hook, "for_layer", None)
    return for_layer(layer) if for_layer is not None else partial(kv_hook, layer)


class Rotary(nn.Module):
    """Cos/sin tables for rotary embeddings on the first `rotary_dims` dims of each head."""

    def __init__(self, rotary_dims: int, max_seq_len: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dims, 2, dtype=torch.float32) / rotary_dims))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: Tensor | None, seq_len: int) -> tuple[Tensor, Tensor]:
        """Tables broadcastable to [B, H, T, rotary_dims]; `positions` is [T] or [B, T] or None (0..T-1)."""
        if positions is None:
            return self.cos[:seq_len], self.sin[:seq_len]
        cos, sin = self.cos[positions], self.sin[positions]
        if positions.dim() == 2:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return cos, sin


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Apply rotary embedding (GPT-NeoX 'rotate half' convention) to the first dims of x, in x's
    dtype as transformers does (under bf16 autocast the fp32 tables would promote q and k)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    n = cos.shape[-1]
    x_rot, x_pass = x[..., :n], x[..., n:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated, x_pass), dim=-1)


@dataclass(frozen=True)
class CausalKeyBias:
    """Causal attention plus an additive bias per key, `bias` [B, T] (PonderLM-3's log w): the
    same logits as the float mask `causal + bias[:, None, None, :]`, passed as this so that the
    attention needs no [T, T] mask (see `causal_attention_with_key_bias`)."""

    bias: Tensor


#: an attention mask: None = plain causal, a per-key bias on causal, or a bool / additive tensor
Mask = Tensor | CausalKeyBias | None


#: Head dims appended to carry a key bias; flash attention wants head dims in multiples of 8.
KEY_BIAS_DIMS = 8
#: Stands in for log 0 = -inf in the key-bias column: exp(-1000) is exactly 0 in fp32, and
#: -1000 * sqrt(Dh) stays finite in fp16.
LOG_ZERO = -1.0e3


def causal_attention_with_key_bias(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(Dh) + bias_key + causal) v, computed as plain causal SDPA.

    q.k + bias = [q, 1] . [k, bias * sqrt(Dh)], so one extra head dim (padded to 8) carries the
    bias and `is_causal=True` replaces the mask: on GPUs flash attention runs instead of the
    memory-efficient kernel with a [B, H, T, T] bias gradient, and no mask is stored per pass.
    The bias still gets its gradient, through the extra key dim.
    """
    b, h, t, dh = q.shape
    scale = dh**-0.5
    extra_q = q.new_zeros(b, h, t, KEY_BIAS_DIMS)
    extra_q[..., 0] = 1.0
    column = (bias.clamp(min=LOG_ZERO) / scale).to(k.dtype)[:, None, :, None].expand(b, h, t, 1)
    extra_k = torch.cat([column, k.new_zeros(b, h, t, KEY_BIAS_DIMS - 1)], dim=-1)
    q, k = torch.cat([q, extra_q], dim=-1), torch.cat([k, extra_k], dim=-1)
    v = torch.cat([v, v.new_zeros(b, h, t, KEY_BIAS_DIMS)], dim=-1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[..., :dh]


#: how many compiled variants of one function (a block class's forward, the scattered attention)
#: a process may hold; past it, fullgraph's recompile limit is a hard error
COMPILED_GRAPHS_PER_FUNCTION = 64


def _scattered_attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(Dh) + mask) v with row j's keys read from k[index[j]]: SDPA's maths
    written as products and sums, so that a compiled graph fuses the read into the attention and
    never copies the keys. q [B, H, A, Dh]; mask [B, 1, A, T], bool or additive."""
    k, v = k[index, :, : mask.shape[-1]], v[index, :, : mask.shape[-1]]
    scores = (q.unsqueeze(3) * k.unsqueeze(2)).sum(-1) * q.shape[-1] ** -0.5  # [B, H, A, T]
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return (scores.softmax(-1).unsqueeze(-1) * v.unsqueeze(2)).sum(3)


@cache
def _compiled_scattered_attention() -> Callable[..., Tensor]:
    # dynamic: one graph for every key length and number of rows (each decode tick has its own);
    # still one per dtype, mask kind (bool, key bias) and single row vs several, so a process that
    # decodes a few models needs more than torch's default of 8 graphs
    allow_compiled_graphs(COMPILED_GRAPHS_PER_FUNCTION)
    return torch.compile(_scattered_attention, dynamic=True, fullgraph=True)


def scattered_attention(q: Tensor, kv: ScatteredKV, mask: Tensor) -> Tensor:
    """Attention for one-token queries over keys that lie scattered in a flat cache, compiled:
    the gathered keys are read in place (eager SDPA would first copy every row's cached keys;
    on CPU that copy was a sixth of an adaptive decode pass at batch 8). Returns [B, H, A, Dh]."""
    return _compiled_scattered_attention()(q, kv.k, kv.v, kv.index, mask)


def attend(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, mask: Mask, kv_hook: LayerKVHook | None
) -> Tensor:
    """What every block type's attention shares: rotary on q and k, the K/V hook, SDPA.
    q, k, v are [B, H, T, Dh]; returns the heads concatenated, [B, T, H * Dh]."""
    b, _, t, _ = q.shape
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    if kv_hook is not None:
        kv = kv_hook(k, v)
        if isinstance(kv, ScatteredKV):
            return scattered_attention(q, kv, mask).transpose(1, 2).reshape(b, t, -1)
        k, v = kv
    if isinstance(mask, CausalKeyBias):
        return causal_attention_with_key_bias(q, k, v, mask.bias).transpose(1, 2).reshape(b, t, -1)
    if mask is not None and mask.is_floating_point() and mask.dtype != q.dtype:
        # An additive mask must match q's dtype (bf16 under autocast) for SDPA's memory-efficient
        # kernel; otherwise it falls back to the math kernel, which keeps [B, H, T, T] per layer.
        mask = mask.to(q.dtype)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1)
    return y.transpose(1, 2).reshape(b, t, -1)


class NeoXAttention(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.query_key_value = Linear(cfg.d_model, 3 * cfg.d_model)
        self.dense = Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Mask, kv_hook: LayerKVHook | None) -> Tensor:
        b, t, _ = x.shape
        # Pythia's fused layout is per head [q|k|v]; keep it so released checkpoints load unchanged.
        qkv = self.query_key_value(x).view(b, t, self.n_head, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.dense(attend(q, k, v, cos, sin, mask, kv_hook))


class NeoXMLP(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = Linear(cfg.d_model, cfg.d_ff)
        self.dense_4h_to_h = Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class Block(nn.Module):
    """A decoder layer: two norms, attention (under transformers' name for it, so checkpoints load
    by renaming) and an MLP; the block types differ in the norm, the parts and the residual wiring."""

    def __init__(
        self, cfg: BackboneConfig, norm: type[nn.Module], attention_name: str, attention: nn.Module, mlp: nn.Module
    ):
        super().__init__()
        self.input_layernorm = norm(cfg.d_model, eps=cfg.norm_eps)
        self.post_attention_layernorm = norm(cfg.d_model, eps=cfg.norm_eps)
        setattr(self, attention_name, attention)
        self.mlp = mlp


class NeoXBlock(Block):
    """Parallel residual: x + attn(ln1(x)) + mlp(ln2(x))."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(cfg, nn.LayerNorm, "attention", NeoXAttention(cfg), NeoXMLP(cfg))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Mask, kv_hook: LayerKVHook | None) -> Tensor:
        attn = self.attention(self.input_layernorm(x), cos, sin, mask, kv_hook)
        return x + attn + self.mlp(self.post_attention_layernorm(x))

    def output_projections(self) -> list[nn.Linear]:
        """The layers whose init is scaled down by depth (they write into the residual stream)."""
        return [self.attention.dense, self.mlp.dense_4h_to_h]


class LlamaAttention(nn.Module):
    """Separate q/k/v/o projections without biases, named as in transformers' LLaMA."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            Linear(cfg.d_model, cfg.d_model, bias=False) for _ in range(4)
        )

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Mask, kv_hook: LayerKVHook | None) -> Tensor:
        b, t, _ = x.shape
        q, k, v = (
            proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        return self.o_proj(attend(q, k, v, cos, sin, mask, kv_hook))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(Block):
    """Sequential residual with RMSNorm: h = x + attn(norm1(x)); h + mlp(norm2(h))."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(cfg, nn.RMSNorm, "self_attn", LlamaAttention(cfg), LlamaMLP(cfg))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Mask, kv_hook: LayerKVHook | None) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_hook)
        return h + self.mlp(self.post_attention_layernorm(h))

    def output_projections(self) -> list[nn.Linear]:
        return [self.self_attn.o_proj, self.mlp.down_proj]


BLOCKS: dict[str, type[Block]] = {"neox": NeoXBlock, "llama": LlamaBlock}
FINAL_NORMS: dict[str, type[nn.Module]] = {"neox": nn.LayerNorm, "llama": nn.RMSNorm}


class CompiledWhenTraining:
    """A layer's forward that runs compiled while autograd records and eager otherwise."""

    def __init__(self, compiled: Callable[..., Tensor], eager: Callable[..., Tensor]) -> None:
        self.compiled, self.eager = compiled, eager

    def __call__(self, *args: Any) -> Tensor:
        return (self.compiled if torch.is_grad_enabled() else self.eager)(*args)


class Backbone(nn.Module):
    """Embedding, decoder layers, final norm and untied LM head of a Pythia-style model; the
    decoder block (GPT-NeoX or LLaMA) follows `cfg.block`, the top-level names stay the same."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_in = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(BLOCKS[cfg.block](cfg) for _ in range(cfg.n_layer))
        self.final_layer_norm = FINAL_NORMS[cfg.block](cfg.d_model, eps=cfg.norm_eps)
        self.embed_out = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.rotary_dims, cfg.max_seq_len, cfg.rotary_base)
        self.activation_checkpointing = False
        #: token embeddings are multiplied by this (a model's sqrt(d) or sqrt(2.5 d); 1 = Pythia)
        self.embed_scale = 1.0

    def init_weights(self, passes_per_token: int = 1) -> None:
        """Pythia/PonderLM init: truncated normal with sigma = sqrt(2 / (5 d)); residual-output
        projections get sigma / sqrt(2 L R), R = how many times the stack runs per token."""
        sigma = math.sqrt(2.0 / (5.0 * self.config.d_model))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=sigma, a=-3 * sigma, b=3 * sigma)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:  # RMSNorm has none
                    nn.init.zeros_(module.bias)
        self.init_output_projections(passes_per_token)

    def init_output_projections(self, passes_per_token: int = 1) -> None:
        """(Re)draw the residual-output projections (attention output, MLP output): truncated
        normal with sigma / sqrt(2 L R). The PonderLM-2 authors' code uses R = K+1 on GPT-NeoX and
        R = 1 on LLaMA; PonderLM-2/3 redraw them when their R differs from `init_weights`'."""
        sigma = math.sqrt(2.0 / (5.0 * self.config.d_model))
        out_sigma = sigma / math.sqrt(2.0 * self.config.n_layer * passes_per_token)
        for layer in self.layers:
            for proj in layer.output_projections():
                nn.init.trunc_normal_(proj.weight, std=out_sigma, a=-3 * out_sigma, b=3 * out_sigma)

    def forward(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        mask: Mask = None,
        kv_hook: KVHook | None = None,
        final_norm: bool = True,
    ) -> Tensor:
        """Run every layer on input embeddings `x` [B, T, d].

        `mask`: None means plain causal attention over x itself; `CausalKeyBias` adds a bias per
        key to it; otherwise a bool (True = attend) or additive float mask broadcastable to
        [B, H, T, T_keys]. Returns hidden states, after the
        final LayerNorm unless `final_norm=False` (LoopTransformer applies it once at the end).
        """
        cos, sin = self.rotary(positions, x.shape[1])
        for i, layer in enumerate(self.layers):
            hook = layer_hook(kv_hook, i)
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, hook, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, hook)
        return self.final_layer_norm(x) if final_norm else x

    def compile_layers(self, backend: str = "inductor") -> None:
        """Compile each decoder layer's forward with `torch.compile(fullgraph=True)` (no graph
        break inside a block; the recurrence and the K/V hooks around it stay Python). The
        compiled forward runs where autograd records (training steps, so shapes are static);
        validation and decoding, whose shapes vary and whose CPU matmuls are oneDNN's, run eager.
        Module names and the state dict are unchanged; sharding (FSDP2) may follow."""
        # Dynamo caches graphs per code object: a block class keeps a few per model (first pass
        # without K/V to align, later passes with it, padded or not) and every model of the
        # process shares them, so torch's default limit of 8 is too low for fullgraph's hard stop.
        allow_compiled_graphs(COMPILED_GRAPHS_PER_FUNCTION)
        for layer in self.layers:
            if not isinstance(layer.forward, CompiledWhenTraining):
                # The class's forward, compiled once with the layer as an input: every layer shares
                # one graph instead of recompiling per instance.
                compiled = torch.compile(type(layer).forward, fullgraph=True, dynamic=False, backend=backend)
                layer.forward = CompiledWhenTraining(partial(compiled, layer), layer.forward)

    def embed(self, tokens: Tensor) -> Tensor:
        """Token embeddings [B, T, d], times `embed_scale`."""
        embeds = self.embed_in(tokens)
        return embeds * self.embed_scale if self.embed_scale != 1.0 else embeds

    def logits(self, h: Tensor) -> Tensor:
        return self.embed_out(h)


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a softmax over logits of `dtype` runs in: fp32 at least (bf16/fp16 logits are
    too coarse over a vocabulary), fp64 for an fp64 model (so fp64 reference checks stay exact)."""
    return torch.promote_types(dtype, torch.float32)


def causal_mask(valid: Tensor) -> Tensor:
    """Bool mask [B, 1, T, T]: causal, padded keys hidden. Each query may always see itself, so a
    padding query never has an empty row (which would make SDPA return NaN)."""
    t = valid.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()
    allowed = causal & valid[:, None, None, :]
    return allowed | torch.eye(t, dtype=torch.bool, device=valid.device)


def positions_from_valid(valid: Tensor) -> Tensor:
    """Rotary positions [B, T] that count only real tokens, so left padding changes nothing."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)
