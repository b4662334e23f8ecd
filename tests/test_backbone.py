"""The backbone is Pythia: same logits as transformers' GPT-NeoX on the same weights."""

import pytest
import torch
import torch.nn.functional as F
from transformers import GPTNeoXForCausalLM

from ponder_lightning.errors import UserError
from ponder_lightning.nn import Backbone, backbone_config, causal_mask, positions_from_valid
from ponder_lightning.nn.backbone import causal_attention_with_key_bias
from ponder_lightning.nn.hf import load_hf_backbone, save_hf_backbone
from ponder_lightning.nn.loss import linear_cross_entropy

VOCAB = 384


def random_backbone() -> Backbone:
    """Tiny backbone with every parameter random (norms and biases too), so no term is trivially zero."""
    model = Backbone(backbone_config("tiny", vocab_size=VOCAB))
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if name.endswith("layernorm.weight") or name.endswith("norm.weight") else 0.0, 0.2)
    return model.eval()


def our_logits(model: Backbone, ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    x = model.embed_in(ids)
    if valid is None:
        return model.logits(model(x))
    return model.logits(model(x, positions=positions_from_valid(valid), mask=causal_mask(valid)))


@pytest.fixture
def pair(tmp_path):
    ours = random_backbone()
    save_hf_backbone(ours, tmp_path / "hf")
    theirs = GPTNeoXForCausalLM.from_pretrained(tmp_path / "hf").eval()
    # Import through our loader, so the test covers HF -> ours as well as ours -> HF.
    return load_hf_backbone(tmp_path / "hf").eval(), theirs


def test_logits_equal_transformers(pair):
    ours, theirs = pair
    ids = torch.randint(0, VOCAB, (3, 37))
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        got = our_logits(ours, ids)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def test_logits_equal_transformers_with_left_padding(pair):
    ours, theirs = pair
    ids = torch.randint(0, VOCAB, (3, 20))
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[0, :7] = False
    valid[1, :2] = False
    positions = positions_from_valid(valid)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=valid.long(), position_ids=positions).logits
        got = our_logits(ours, ids, valid)
        alone = our_logits(ours, ids[0:1, 7:])
    assert torch.allclose(got[valid], expected[valid], atol=1e-5, rtol=0)
    # Padding changes nothing for the real tokens, and padding rows stay finite.
    assert torch.allclose(got[0, 7:], alone[0], atol=1e-5, rtol=0)
    assert torch.isfinite(got).all()


def test_save_load_round_trip(tmp_path):
    model = random_backbone()
    save_hf_backbone(model, tmp_path / "ckpt")
    loaded = load_hf_backbone(tmp_path / "ckpt").eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.equal(our_logits(model, ids), our_logits(loaded, ids))
    assert loaded.config == model.config


def test_causality():
    model = random_backbone()
    ids = torch.randint(0, VOCAB, (2, 24))
    changed = ids.clone()
    changed[:, 10:] = torch.randint(0, VOCAB, (2, 14))
    with torch.no_grad():
        a, b = our_logits(model, ids), our_logits(model, changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_kv_hook_sees_and_replaces_keys_and_values():
    model = random_backbone()
    ids = torch.randint(0, VOCAB, (1, 8))
    seen = []

    def zero_values(layer, k, v):
        seen.append((layer, tuple(k.shape)))
        return k, torch.zeros_like(v)

    with torch.no_grad():
        hooked = model(model.embed_in(ids), kv_hook=zero_values)
        plain = model(model.embed_in(ids))
    cfg = model.config
    assert seen == [(i, (1, cfg.n_head, 8, cfg.head_dim)) for i in range(cfg.n_layer)]
    assert not torch.allclose(hooked, plain)


def test_init_follows_the_paper():
    cfg = backbone_config("pythia-14m", vocab_size=512)
    model = Backbone(cfg)
    model.init_weights(passes_per_token=4)
    sigma = (2 / (5 * cfg.d_model)) ** 0.5
    qkv = model.layers[0].attention.query_key_value.weight
    out = model.layers[0].attention.dense.weight
    assert abs(qkv.std().item() - sigma * 0.986) < 0.03 * sigma  # truncation at 3 sigma shrinks std by 1.4%
    assert qkv.abs().max() <= 3 * sigma + 1e-6
    assert abs(out.std().item() / qkv.std().item() - (2 * cfg.n_layer * 4) ** -0.5) < 0.05
    assert torch.all(model.layers[0].attention.query_key_value.bias == 0)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(UserError, match="pythia-15m"):
        backbone_config("pythia-15m")


def test_load_rejects_missing_directory(tmp_path):
    with pytest.raises(UserError, match="not a local directory"):
        load_hf_backbone(tmp_path / "nope")


def test_fused_linear_cross_entropy_equals_reference():
    h = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 300, (50,))
    t[[3, 17]] = -100
    ref = F.cross_entropy(h @ w.T, t, ignore_index=-100)
    gh, gw = torch.autograd.grad(2.5 * ref, (h, w))
    got = linear_cross_entropy(h, w, t, chunk_elements=300 * 7)  # several chunks, last one ragged
    fh, fw = torch.autograd.grad(2.5 * got, (h, w))
    assert torch.allclose(got, ref, atol=1e-12)
    assert torch.allclose(fh, gh, atol=1e-12) and torch.allclose(fw, gw, atol=1e-12)


def test_fused_linear_cross_entropy_runs_the_head_in_the_autocast_dtype():
    """Under bf16 autocast (`precision: bf16-mixed`) all three head matmuls run in bf16, as the
    unfused path does: autocast would skip the in-place/out= ones and leave them in fp32 (a 2x
    slower training step on GPUs)."""
    h = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(500, 32, requires_grad=True)
    t = torch.randint(0, 500, (64,))
    t[5] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(h @ w.T, t, ignore_index=-100)
        got = linear_cross_entropy(h, w, t, chunk_elements=500 * 9)
    rh, rw = torch.autograd.grad(ref, (h, w))
    gh, gw = torch.autograd.grad(got, (h, w))
    assert gh.dtype == gw.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-6)
    assert torch.allclose(gh, rh, atol=1e-6), (gh - rh).abs().max()  # an fp32 matmul would differ by ~3e-4
    assert torch.allclose(gw, rw, atol=1e-3)  # per-chunk bf16 rounding of the weight gradient


def test_causal_key_bias_equals_the_float_mask_it_replaces():
    """PonderLM-3's per-key log w, carried in an extra head dim with plain causal SDPA, gives the
    outputs and gradients of the additive [T, T] mask; log 0 keys get exactly zero weight."""
    b, h, t, dh = 2, 3, 10, 16
    q, k, v = (torch.randn(b, h, t, dh, dtype=torch.float64, requires_grad=True) for _ in range(3))
    w = torch.rand(b, t, dtype=torch.float64)
    w[0, 3] = w[1, 7] = 0.0  # pruned slots
    bias = torch.where(w > 0, w, 1.0).log().masked_fill(w == 0, float("-inf")).requires_grad_()
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mask = torch.where(causal, bias[:, None, None, :], float("-inf"))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = causal_attention_with_key_bias(q, k, v, bias)
    assert torch.allclose(got, ref, atol=1e-12)
    grads_ref = torch.autograd.grad((ref * ref).sum(), (q, k, v, bias))
    grads_got = torch.autograd.grad((got * got).sum(), (q, k, v, bias))
    for name, g, r in zip("qkv", grads_got[:3], grads_ref[:3], strict=True):
        assert torch.allclose(g, r, atol=1e-10), name
    finite = torch.isfinite(bias)
    assert torch.allclose(grads_got[3][finite], grads_ref[3][finite], atol=1e-10)
    assert (grads_got[3][~finite] == 0).all()  # a pruned key has no weight, so no gradient
