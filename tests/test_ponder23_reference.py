"""PonderLM-2/3 against a naive reference written from the papers, in float64.

The reference below shares no code with `ponder_lightning/nn/latent.py`, the recurrence or the
backbone's attention: it reads the model's weights and recomputes everything with plain tensor
ops. It builds the interleaved sequence `x_1 z_1^1 .. z_1^K x_2 ..` itself, an explicit full
[L, L] attention mask (boolean: key slot (t', k') is visible to query slot (t, k) iff t' < t, or
t' == t and k' <= k, and t' is a real token; PonderLM-3 adds log w_{t',k'} to every query's logit
for that key) and runs softmax(Q K^T / sqrt(d_head) + mask) V with its own rotary embedding.

- PonderLM-2: a latent is the last hidden state (after the final norm) of the slot before it;
  every slot of token t has rotary position t (the count of real tokens before it). Training
  form: K build-up passes (widths 1..K, each pass refreshing every latent it has and adding the
  next), J Jacobi passes over all K+1 slots (every latent from the previous pass), a final pass;
  the prediction for token t+1 is read from slot (t, K).
- PonderLM-3: PonderLM-2 plus s_t = softmax(router(h_t^(0))) over k = 0..K, refreshed from the
  token slot's output of every pass and used by the next one (attention bias log w, w_{t,k} =
  sum_{j>=k} s_{t,j}); the prediction is sum_k s_{t,k} h_t^(k) of the final pass.
- Exact sequential form (what decoding computes): slot after slot, each one's output taken from
  a full forward over the slots before it with the same explicit mask.

Checked: the model's forward (evaluation's J) and training loss equal the Jacobi reference;
its step-by-step and row-wise decoding equal the sequential reference; the Jacobi reference with
J = T*K equals the sequential one (the papers' claim that Jacobi converges to the sequential
model, here for the reference itself). Also: the per-block defaults taken from the authors' code
(J drawn from {2, 3, 4} on GPT-NeoX and {2, 3} on LLaMA; output projections initialised with
sigma / sqrt(2 L (K+1)) on GPT-NeoX and sigma / sqrt(2 L) on LLaMA).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from decode_helpers import decode_incrementally, decode_rowwise
from torch import Tensor

from ponder_lightning.models import PonderLM2, PonderLM3

VOCAB = 256
TOL = 1e-5

pytestmark = pytest.mark.usefixtures("single_thread")


# -- the reference -------------------------------------------------------------------------------
def norm(x: Tensor, module, block: str) -> Tensor:
    """LayerNorm (GPT-NeoX) or RMSNorm (LLaMA) with the module's weights."""
    if block == "neox":
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + module.eps) * module.weight + module.bias
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + module.eps) * module.weight


def rope(x: Tensor, positions: Tensor, rotary_dims: int, base: float) -> Tensor:
    """GPT-NeoX rotary ('rotate half') on the first `rotary_dims` dims of each head.
    x [B, H, L, Dh], positions [B, L]."""
    half = rotary_dims // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64) * 2 / rotary_dims)
    angle = positions.double()[:, None, :, None] * inv_freq  # [B, 1, L, half]
    cos, sin = angle.cos(), angle.sin()
    x1, x2, rest = x[..., :half], x[..., half:rotary_dims], x[..., rotary_dims:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def attention(q: Tensor, k: Tensor, v: Tensor, additive_mask: Tensor) -> Tensor:
    """Plain softmax(Q K^T / sqrt(d) + mask) V; q, k, v [B, H, L, Dh], mask [B, L, L]."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + additive_mask[:, None]
    return torch.softmax(logits, dim=-1) @ v


def reference_backbone(model, x: Tensor, positions: Tensor, additive_mask: Tensor) -> Tensor:
    """Every layer and the final norm on slot inputs x [B, L, d]; nothing of the backbone's own
    forward or attention is called, only its weights are read."""
    cfg = model.backbone.config
    b, length, d = x.shape
    heads, dh = cfg.n_head, d // cfg.n_head

    def split(y: Tensor) -> Tensor:  # [B, L, d] -> [B, H, L, Dh]
        return y.view(b, length, heads, dh).transpose(1, 2)

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k = (
            rope(q, positions, cfg.rotary_dims, cfg.rotary_base),
            rope(k, positions, cfg.rotary_dims, cfg.rotary_base),
        )
        return attention(q, k, v, additive_mask).transpose(1, 2).reshape(b, length, d)

    for layer in model.backbone.layers:
        if cfg.block == "neox":  # parallel residual; fused QKV laid out per head as [q | k | v]
            att = layer.attention
            qkv = F.linear(norm(x, layer.input_layernorm, "neox"), att.query_key_value.weight, att.query_key_value.bias)
            qkv = qkv.view(b, length, heads, 3, dh)
            q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
            a = F.linear(attend(q, k, v), att.dense.weight, att.dense.bias)
            mlp = layer.mlp
            hidden = F.gelu(
                F.linear(
                    norm(x, layer.post_attention_layernorm, "neox"), mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias
                )
            )
            x = x + a + F.linear(hidden, mlp.dense_4h_to_h.weight, mlp.dense_4h_to_h.bias)
        else:  # LLaMA: sequential residual, RMSNorm, separate q/k/v/o without biases, SwiGLU
            att = layer.self_attn
            y = norm(x, layer.input_layernorm, "llama")
            q, k, v = (split(y @ proj.weight.T) for proj in (att.q_proj, att.k_proj, att.v_proj))
            x = x + attend(q, k, v) @ att.o_proj.weight.T
            y = norm(x, layer.post_attention_layernorm, "llama")
            mlp = layer.mlp
            x = x + (F.silu(y @ mlp.gate_proj.weight.T) * (y @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    return norm(x, model.backbone.final_layer_norm, cfg.block)


def router_probs(model, h0: Tensor) -> Tensor:
    """s = softmax(Linear(h)) over k = 0..K (PonderLM-3's default router)."""
    net = model.router.net
    return torch.softmax(F.linear(h0, net.weight.double(), net.bias.double()), dim=-1)


def tail(s: Tensor) -> Tensor:
    """w_k = sum_{j >= k} s_j."""
    return torch.stack([s[..., k:].sum(-1) for k in range(s.shape[-1])], dim=-1)


def interleaved_pass(model, stages: list[Tensor], valid: Tensor, s: Tensor | None) -> list[Tensor]:
    """One backbone pass over the interleaved sequence of `stages` (stage k = the inputs of slot
    k of every token, [B, T, d]); returns the output of each slot k, [B, T, d]."""
    b, t, d = stages[0].shape
    width = len(stages)
    token = torch.arange(t).repeat_interleave(width)  # slot i = token i // width, latent i % width
    slot = torch.arange(width).repeat(t)
    x = torch.stack(stages, dim=2).reshape(b, t * width, d)
    assert all(
        torch.equal(x[:, i], stages[slot[i]][:, token[i]]) for i in range(t * width)
    )  # x_1 z_1^1 .. z_1^K x_2 ..
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)[:, token]  # all slots of token t: position t
    earlier = (token[None, :] < token[:, None]) | (
        (token[None, :] == token[:, None]) & (slot[None, :] <= slot[:, None])
    )  # [query, key]
    allowed = earlier[None] & valid[:, token][:, None, :]
    allowed |= torch.eye(t * width, dtype=torch.bool)[None]  # a padding query sees itself (never read)
    mask = torch.zeros(b, t * width, t * width, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    if s is not None:
        log_w = tail(s)[:, :, :width].log()  # [B, T, width]
        mask = mask + log_w[:, token, slot][:, None, :]  # the key's log w, for every query
    h = reference_backbone(model, x, positions, mask)
    return [h[:, k::width] for k in range(width)]


def reference_jacobi(model, ids: Tensor, valid: Tensor, jacobi: int) -> tuple[Tensor, Tensor | None]:
    """Logits [B, T, V] of the training form with J Jacobi passes (and PonderLM-3's w)."""
    k_max = model.hparams.latent_steps
    ponder3 = isinstance(model, PonderLM3)
    scale = math.sqrt(2.5 * model.config.d_model) if model.hparams.scale_embeds else 1.0
    e = model.backbone.embed_in.weight[ids] * scale
    latents: list[Tensor] = []
    s = None
    for n in range(k_max + jacobi + 1):
        h = interleaved_pass(model, [e] + latents, valid, s)
        if n == k_max + jacobi:
            break
        latents = h[: min(n + 1, k_max)]  # latent k+1 <- output of slot k; build-up adds one each pass
        if ponder3:
            s = router_probs(model, h[0])
    out = h[k_max] if s is None else sum(s[..., k, None] * h[k] for k in range(k_max + 1))
    return F.linear(out, model.backbone.embed_out.weight), None if s is None else tail(s)


def reference_sequential(model, ids: Tensor) -> Tensor:
    """Logits of the exact model: slot after slot, each slot's output read from a forward over
    every slot so far (no cache), with the same explicit mask."""
    b, t = ids.shape
    k_max = model.hparams.latent_steps
    ponder3 = isinstance(model, PonderLM3)
    scale = math.sqrt(2.5 * model.config.d_model) if model.hparams.scale_embeds else 1.0
    e = model.backbone.embed_in.weight[ids] * scale
    inputs, tokens, bias, outputs = [], [], [], []
    for pos in range(t):
        x, out, w = e[:, pos], torch.zeros_like(e[:, pos]), None
        for k in range(k_max + 1):
            inputs.append(x)
            tokens.append(pos)
            bias.append(torch.zeros(b, dtype=torch.float64) if w is None else w[:, k].log())
            n = len(inputs)
            tok = torch.tensor(tokens)
            allowed = torch.ones(n, n, dtype=torch.bool).tril()  # slot order = (token, latent) order
            assert torch.equal(allowed, (tok[None, :] <= tok[:, None]) & allowed)
            mask = (
                torch.zeros(n, n, dtype=torch.float64).masked_fill(~allowed, float("-inf"))[None]
                + torch.stack(bias, 1)[:, None, :]
            )
            h = reference_backbone(model, torch.stack(inputs, 1), tok.expand(b, n), mask)[:, -1]
            if ponder3 and k == 0:
                s = router_probs(model, h)
                w = tail(s)
            out = h if not ponder3 else out + s[:, k, None] * h
            x = h
        outputs.append(out)
    return F.linear(torch.stack(outputs, 1), model.backbone.embed_out.weight)


# -- the models ----------------------------------------------------------------------------------
def build(cls, size: str, latent_steps: int) -> PonderLM2:
    """A float64 model whose latents matter: matrices x3 on GPT-NeoX, x2 on LLaMA (at init the
    Jacobi map is nearly a contraction and J = 3 already looks exact; LLaMA's output projections
    start sqrt(K+1) larger), random norm weights and biases (so the layout of every parameter
    shows). The model's rotary tables are float32 (as in transformers): gaps of ~1e-7 remain in
    float64."""
    model = cls(size=size, vocab_size=VOCAB, latent_steps=latent_steps).double().eval()
    scale = 3.0 if model.config.block == "neox" else 2.0
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(scale)
            elif p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
        if cls is PonderLM3:
            model.router.net.bias.normal_(0.0, 1.0)
    return model


CASES = [
    pytest.param(PonderLM2, "tiny", 1, id="ponder2-neox-K1"),
    pytest.param(PonderLM2, "tiny", 2, id="ponder2-neox-K2"),
    pytest.param(PonderLM2, "llama-tiny", 1, id="ponder2-llama-K1"),
    pytest.param(PonderLM2, "llama-tiny", 2, id="ponder2-llama-K2"),
    pytest.param(PonderLM3, "llama-tiny", 3, id="ponder3-llama"),
    pytest.param(PonderLM3, "tiny", 3, id="ponder3-neox"),
]


def max_gap(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("cls, size, latent_steps", CASES)
def test_training_form_equals_the_reference(cls, size, latent_steps):
    """Teacher-forced forward at evaluation's J, with and without left padding, and the
    training loss at the J the step drew."""
    model = build(cls, size, latent_steps)
    ids = torch.randint(0, VOCAB, (2, 7))
    every = torch.ones_like(ids, dtype=torch.bool)
    jacobi = model.hparams.jacobi_eval
    expected, w = reference_jacobi(model, ids, every, jacobi)
    with torch.no_grad():
        got = model(ids)
        hidden, trace = model.latent(ids, None, jacobi)
    print(f"\n{cls.__name__} {size} K={latent_steps}: max |logit gap| to the reference {max_gap(got, expected):.1e}")
    assert max_gap(got, expected) <= TOL, max_gap(got, expected)
    if w is not None:  # PonderLM-3's visibilities w_1..w_K, as logged
        assert max_gap(torch.stack(trace.scores, -1).double(), w[..., 1:]) <= 1e-6
    # The comparison can tell the schedule apart: one Jacobi pass less is far off.
    assert max_gap(got, reference_jacobi(model, ids, every, jacobi - 1)[0]) > 100 * TOL

    valid = every.clone()
    valid[0, :3] = False  # left padding in row 0
    padded = ids.masked_fill(~valid, 0)
    expected_padded, _ = reference_jacobi(model, padded, valid, jacobi)
    with torch.no_grad():
        got_padded = model(padded, valid)
    assert max_gap(got_padded[valid], expected_padded[valid]) <= TOL

    model.train()  # the training loss at the J drawn for this step: CE of the slot read out for t -> t+1
    batch = torch.randint(0, VOCAB, (2, 8))
    loss, _, _ = model.training_loss(batch)
    logits, _ = reference_jacobi(model, batch[:, :-1], torch.ones(2, 7, dtype=torch.bool), model.jacobi_passes())
    reference_loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    assert abs(loss.item() - reference_loss.item()) <= TOL


@pytest.mark.parametrize("cls, size, latent_steps", [CASES[1], CASES[2], CASES[4]])
def test_decoding_equals_the_sequential_reference(cls, size, latent_steps):
    """Step-by-step and row-wise decoding compute the exact sequential model; the Jacobi
    reference reaches it with J = T*K passes (and so does the model's training form)."""
    model = build(cls, size, latent_steps)
    if cls is PonderLM3:
        model.latent.tau = 0.0  # nothing pruned: the soft training form sees every slot too
    ids = torch.randint(0, VOCAB, (2, 6))
    expected = reference_sequential(model, ids)
    decoded, depth, _ = decode_incrementally(model, ids, prefill=2)
    assert torch.all(depth == latent_steps + 1)
    assert max_gap(decoded, expected) <= TOL, max_gap(decoded, expected)
    rowwise, _, _ = decode_rowwise(model, ids, prefill=3)
    assert max_gap(rowwise, expected[:, 3:]) <= TOL
    bound = ids.shape[1] * latent_steps
    jacobi, _ = reference_jacobi(model, ids, torch.ones_like(ids, dtype=torch.bool), bound)
    assert max_gap(jacobi, expected) <= TOL
    with torch.no_grad():
        hidden, _ = model.latent(ids, None, bound)
    assert max_gap(model.backbone.logits(hidden), expected) <= TOL
    # and at the papers' J the sequential model is only approximated (else this proves little)
    assert max_gap(reference_jacobi(model, ids, torch.ones_like(ids, dtype=torch.bool), 2)[0], expected) > 100 * TOL


# -- defaults taken from the authors' code (LUMIA-Group/PonderLM-2) -------------------------------
@pytest.mark.parametrize("size, choices", [("tiny", {2, 3, 4}), ("llama-tiny", {2, 3})])
def test_jacobi_draw_defaults_to_the_authors_per_block(size, choices, monkeypatch):
    """modeling_gpt_neox.py draws J = torch.randint(2, 5), modeling_llama.py torch.randint(2, 4)."""
    model = PonderLM2(size=size, vocab_size=VOCAB).train()
    seen = set()
    for step in range(60):
        monkeypatch.setattr(PonderLM2, "global_step", property(lambda self, step=step: step))
        seen.add(model.jacobi_passes())
    assert seen == choices
    assert PonderLM2(size=size, vocab_size=VOCAB, jacobi_choices=(2, 3)).jacobi_choice_set == (2, 3)
    assert model.eval().jacobi_passes() == 3


@pytest.mark.parametrize(
    "cls, size, passes", [(PonderLM2, "tiny", 2), (PonderLM2, "llama-tiny", 1), (PonderLM3, "llama-tiny", 1)]
)
def test_output_projection_init_follows_the_authors_per_block(cls, size, passes):
    """sigma / sqrt(2 L (K+1)) on GPT-NeoX (modeling_gpt_neox.py), sigma / sqrt(2 L) on LLaMA
    (modeling_llama.py); `output_init_passes` sets R explicitly."""

    def out_std(model) -> float:
        return (
            torch.cat([p.weight.flatten() for layer in model.backbone.layers for p in layer.output_projections()])
            .std()
            .item()
        )

    model = cls(size=size, vocab_size=VOCAB, **({} if cls is PonderLM3 else {"latent_steps": 1}))
    cfg = model.config
    sigma = math.sqrt(2 / (5 * cfg.d_model))
    truncation = 0.9866  # std of a normal truncated at +-3 sigma, in sigmas
    assert model.output_init_passes == passes
    assert out_std(model) == pytest.approx(truncation * sigma / math.sqrt(2 * cfg.n_layer * passes), rel=0.05)
    explicit = cls(size=size, vocab_size=VOCAB, output_init_passes=8)
    assert out_std(explicit) == pytest.approx(truncation * sigma / math.sqrt(2 * cfg.n_layer * 8), rel=0.05)
