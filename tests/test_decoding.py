"""Decoding equals the training forward, for every model, with tokens halting at different
iterations; batching changes nothing; halted tokens really cost no backbone compute."""

import math

import pytest
import torch
import torch.nn.functional as F
from decode_helpers import assert_batch_equals_each_alone, decode_incrementally, decode_rowwise
from halting import make_gates_halt

from ponder_lightning.data import load_tokenizer
from ponder_lightning.errors import UserError
from ponder_lightning.gates import BottomKGate, FixedRatioGate, SingleMLPGate
from ponder_lightning.generate import generate, sample
from ponder_lightning.models import AdaPonderLM, LoopTransformer, PonderLM, VanillaLM
from ponder_lightning.nn import backbone, onednn
from ponder_lightning.nn.backbone import ScatteredKV, scattered_attention

VOCAB = 256


def halting_adaponder(gate=None) -> AdaPonderLM:
    """AdaPonderLM whose gates halt a good share of tokens at every iteration (random last layer
    with a negative bias), so depths 1..4 all occur."""
    return make_gates_halt(AdaPonderLM(size="tiny", vocab_size=VOCAB, gate=gate), weight_std=3.0, bias=-6.0).eval()


def trained_bottom_k() -> AdaPonderLM:
    model = AdaPonderLM(size="tiny", vocab_size=VOCAB, gate=BottomKGate(ratio=0.3, momentum=0.0))
    model.train()
    with torch.no_grad():
        model.hidden_states(torch.randint(0, VOCAB, (4, 32)))  # learns the thresholds
    return model.eval()


MODELS = {
    "vanilla": lambda: VanillaLM(size="tiny", vocab_size=VOCAB),
    "ponderlm": lambda: PonderLM(size="tiny", vocab_size=VOCAB),
    "ponderlm_topk": lambda: PonderLM(size="tiny", vocab_size=VOCAB, mixture_top_k=7, multiply_pondering_steps=True),
    "loop": lambda: LoopTransformer(size="tiny", vocab_size=VOCAB),
    "loop_injection": lambda: LoopTransformer(size="tiny", vocab_size=VOCAB, input_injection=True),
    "adaponder_halting": halting_adaponder,
    "adaponder_single_mlp": lambda: halting_adaponder(SingleMLPGate()),
    "adaponder_bottom_k": trained_bottom_k,
    "ponderlm_fixed_ratio": lambda: PonderLM(size="tiny", vocab_size=VOCAB, gate=FixedRatioGate(target_depth=2.6)),
    "loop_fixed_ratio": lambda: LoopTransformer(
        size="tiny", vocab_size=VOCAB, gate=FixedRatioGate(target_depth=2.6, schedule="geometric")
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("prefill", [1, 9])
def test_decoding_equals_teacher_forced(name, prefill):
    model = MODELS[name]().eval()
    ids = torch.randint(0, VOCAB, (3, 24))
    with torch.no_grad():
        hidden, trace = model.hidden_states(ids)
        expected = model.backbone.logits(hidden)
    got, depth, _ = decode_incrementally(model, ids, prefill)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    assert torch.equal(depth, trace.depth())
    if name in ("adaponder_halting", "adaponder_bottom_k", "ponderlm_fixed_ratio"):
        assert len(depth.unique()) >= 3, (
            f"tokens should halt at several iterations, got depths {depth.unique().tolist()}"
        )


@pytest.mark.parametrize("name", list(MODELS))
def test_rowwise_decoding_equals_teacher_forced(name):
    """Rows run their own tokens' iterations in each backbone call, so they drift apart when
    tokens halt at different depths; the logits must still be those of the training forward, and
    the backbone calls must follow the deepest row's total passes, not depth x tokens."""
    model = MODELS[name]().eval()
    ids = torch.randint(0, VOCAB, (4, 20))
    with torch.no_grad():
        hidden, trace = model.hidden_states(ids)
        expected = model.backbone.logits(hidden)[:, 6:]
    got, depth, ticks = decode_rowwise(model, ids, prefill=6)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    assert torch.equal(depth, trace.depth()[:, 6:])
    assert ticks == int(depth.sum(1).max())
    if name == "adaponder_halting":
        assert ticks < 14 * model.n_iterations and len(depth.sum(1).unique()) > 1, "rows should drift apart"


def test_scattered_attention_equals_sdpa_on_the_copied_keys():
    """The compiled attention that reads each row's keys where they lie (rows at different
    iterations of a flat cache) computes what SDPA computes on the keys copied out, for bool and
    additive (PonderLM-3's key bias) masks, every key length (one dynamic graph), one row or
    several, fp32 and fp64, with and without autograd recording. That is more than torch's
    default of 8 graphs per function, which is a hard error under fullgraph: it passed the suite
    only when an earlier test had raised the limit (dynamo starts afresh here, at the default)."""
    torch._dynamo.reset()
    backbone._compiled_scattered_attention.cache_clear()
    try:
        with torch._dynamo.config.patch(recompile_limit=8):
            for dtype, rows, grad in [
                (d, r, g)
                for d in (torch.float64, torch.float32)
                for r in ([7, 0, 11, 3, 3], [4])
                for g in (True, False)
            ]:
                k, v = torch.randn(2, 12, 3, 40, 8, dtype=dtype).unbind(0)  # flat cache [E, H, L, Dh]
                index = torch.tensor(rows)  # rows may read the same entry
                for length in (9, 17, 40):
                    q = torch.randn(len(rows), 3, 1, 8, dtype=dtype)
                    allowed = torch.rand(len(rows), 1, 1, length) < 0.7
                    allowed[..., -1] = True  # a query sees itself
                    bias = torch.where(allowed, torch.randn(len(rows), 1, 1, length, dtype=dtype), float("-inf"))
                    keys, values = k[index, :, :length], v[index, :, :length]
                    for mask in (allowed, bias):
                        with torch.set_grad_enabled(grad):
                            got = scattered_attention(q, ScatteredKV(k, v, index), mask)
                        expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
                        atol = 1e-12 if dtype == torch.float64 else 1e-5
                        assert torch.allclose(got, expected, atol=atol, rtol=0), (got - expected).abs().max()
    finally:  # the patch restored the default limit: let the next compile raise it again
        backbone._compiled_scattered_attention.cache_clear()


@pytest.mark.parametrize("name", ["adaponder_halting", "ponderlm_fixed_ratio", "vanilla"])
def test_rowwise_decoding_with_compiled_attention_equals_teacher_forced(name, monkeypatch):
    """`generate(compile_attention=True)`: ticks whose rows are at different iterations (or that
    run some rows only) attend through the compiled in-place attention, and decoding still equals
    the training forward."""
    calls = []
    monkeypatch.setattr(backbone, "scattered_attention", lambda *args: calls.append(1) or scattered_attention(*args))
    model = MODELS[name]().eval()
    ids = torch.randint(0, VOCAB, (4, 20))
    with torch.no_grad():
        hidden, trace = model.hidden_states(ids)
        expected = model.backbone.logits(hidden)[:, 6:]
    got, depth, _ = decode_rowwise(model, ids, prefill=6, compile_attention=True)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    assert torch.equal(depth, trace.depth()[:, 6:])
    assert bool(calls) == (name != "vanilla"), "only rows at different iterations need the in-place read"


def test_rowwise_decoding_runs_one_backbone_row_per_pass():
    """Each tick runs one backbone row per row in flight, and the rows add up to the passes the
    tokens needed, per iteration: halted tokens cost nothing, also when rows are at different
    iterations in the same backbone call."""
    model = halting_adaponder()
    ids = torch.randint(0, VOCAB, (4, 16))
    with torch.no_grad():
        _, trace = model.hidden_states(ids)
    processed: list[int] = []
    handle = model.backbone.layers[0].register_forward_hook(
        lambda mod, args, out: processed.append(args[0].shape[0] * args[0].shape[1])
    )
    try:
        _, depth, ticks, evaluations = decode_rowwise(model, ids, prefill=8, with_evaluations=True)
    finally:
        handle.remove()
    assert evaluations == [int(a[:, 8:].sum()) for a in trace.active]
    assert sum(processed[-ticks:]) == int(depth.sum()) == sum(evaluations)
    assert evaluations[-1] < evaluations[0], "some tokens must halt for this test to mean anything"


@pytest.mark.parametrize("name", ["ponderlm", "adaponder_halting", "loop_fixed_ratio"])
def test_batch_of_ragged_prompts_equals_each_prompt_alone(name):
    assert_batch_equals_each_alone(MODELS[name](), VOCAB, max_new_tokens=8)


def test_generation_runs_without_autograd():
    """Decoding keeps no graph (memory), and the CPU packed-weight kernels need autograd off."""
    model = halting_adaponder()
    grad_modes = []

    def recording(method):
        def call(*args, **kwargs):
            grad_modes.append(torch.is_grad_enabled())
            return method(*args, **kwargs)

        return call

    model.backbone.forward = recording(model.backbone.forward)
    model.backbone.logits = recording(model.backbone.logits)
    with torch.enable_grad():
        generate(model, [[1, 2, 3]], max_new_tokens=3)
    assert grad_modes and not any(grad_modes)


def test_greedy_generation_follows_teacher_forced_argmax():
    model = halting_adaponder()
    prompt = torch.randint(0, VOCAB, (6,)).tolist()
    out = generate(model, [prompt], max_new_tokens=6)
    full = torch.tensor([prompt + out.tokens[0]])
    with torch.no_grad():
        hidden, trace = model.hidden_states(full)
        logits = model.backbone.logits(hidden)
    expected = logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
    assert out.tokens[0] == expected
    assert out.depths[0] == trace.depth()[0, len(prompt) - 1 : -1].tolist()


def test_halted_tokens_cost_no_backbone_compute():
    """Count the rows each iteration's backbone actually processes (a hook on the first layer)."""
    model = halting_adaponder()
    processed: list[int] = []
    handle = model.backbone.layers[0].register_forward_hook(
        lambda mod, args, out: processed.append(args[0].shape[0] * args[0].shape[1])
    )
    ids = torch.randint(0, VOCAB, (4, 16))
    with torch.no_grad():
        _, trace = model.hidden_states(ids)
    processed.clear()
    cache = model.new_cache(1, 16)
    _, _, counts = model.extend(
        ids[:1, :12], torch.ones(1, 12, dtype=torch.bool), cache
    )  # batch-1 prefill packs exactly
    prefill_rows = list(processed)
    active_first_row = [int(a[0, :12].sum()) for a in trace.active]
    assert counts == active_first_row and [c for c in counts if c] == prefill_rows
    assert counts[-1] < counts[0], "some tokens must halt for this test to mean anything"
    handle.remove()

    cache = model.new_cache(4, 16)
    model.extend(ids[:, :12], torch.ones(4, 12, dtype=torch.bool), cache)
    handle = model.backbone.layers[0].register_forward_hook(
        lambda mod, args, out: processed.append(args[0].shape[0] * args[0].shape[1])
    )
    for t in range(12, 16):
        processed.clear()
        _, _, counts = model.extend(ids[:, t : t + 1], torch.ones(4, 1, dtype=torch.bool), cache)
        expected = [int(a[:, t].sum()) for a in trace.active]
        assert counts == expected
        assert processed == [c for c in expected if c]  # one backbone row per active token, none for halted ones
    handle.remove()


def test_sampling_controls():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, 0.0, None, None, None), logits.argmax(-1))
    assert torch.equal(sample(logits, 1.0, 1, None, None), logits.argmax(-1))
    assert torch.equal(sample(logits, 1.0, None, 1e-6, None), logits.argmax(-1))

    def draws():
        return sample(logits, 1.0, 5, None, torch.Generator().manual_seed(3))

    assert torch.equal(draws(), draws())
    top5 = logits.topk(5, dim=-1).indices
    for _ in range(20):
        token = sample(logits, 2.0, 5, None, None)
        assert all(token[i] in top5[i] for i in range(4))


def test_generation_fills_the_context_and_no_more():
    """The last new token is never fed back: a prompt of the full context still yields one token."""
    model = PonderLM(size="tiny", vocab_size=VOCAB, max_seq_len=16)
    assert len(generate(model, [list(range(16))], max_new_tokens=1).tokens[0]) == 1
    assert len(generate(model, [list(range(10))], max_new_tokens=7).tokens[0]) == 7
    with pytest.raises(UserError, match="take 17 positions, beyond the model's context max_seq_len=16"):
        generate(model, [list(range(16))], max_new_tokens=2)


def test_stop_tokens_and_text_prompts():
    tokenizer = load_tokenizer("bytes")
    model = PonderLM(size="tiny", vocab_size=384)
    free = generate(model, ["abc"], tokenizer=tokenizer, max_new_tokens=6)
    stop_at = free.tokens[0][2]
    stopped = generate(model, ["abc"], tokenizer=tokenizer, max_new_tokens=6, stop_tokens=[stop_at])
    assert stopped.tokens[0] == free.tokens[0][: free.tokens[0].index(stop_at) + 1]
    assert all(t < tokenizer.vocab_size for t in free.tokens[0])
    assert isinstance(free.texts[0], str) and free.stats["generated_tokens"] == 6


def test_cpu_generation_multiplies_on_packed_weights():
    """On CPU, decoding's matmuls run on oneDNN-packed copies of the weights (`nn/onednn.py`), so
    the equality tests above cover that path."""
    model = PonderLM(size="tiny", vocab_size=VOCAB).eval()
    generate(model, [[1, 2, 3]], max_new_tokens=2)
    backbone = model.backbone
    for weight in (
        backbone.embed_out.weight,
        backbone.layers[0].attention.query_key_value.weight,
        backbone.layers[-1].mlp.dense_4h_to_h.weight,
    ):
        assert (id(weight), False) in onednn._packed
    assert (id(backbone.embed_in.weight), True) in onednn._packed  # the mixture's table, transposed


def test_a_batch_decodes_in_as_many_passes_as_its_deepest_row_needs():
    """Row-wise decoding: each backbone call advances every row, so a batch whose rows halt at
    different iterations takes the passes of its deepest row, not the sum of per-token maxima."""
    model = halting_adaponder()
    out = generate(model, torch.randint(0, VOCAB, (4, 6)).tolist(), max_new_tokens=12)
    per_row = [sum(d[1:]) for d in out.depths]  # the first token comes from the prompt's passes
    lock_step = sum(max(d[k] for d in out.depths) for k in range(1, 12))
    assert out.stats["decode_passes"] == max(per_row) < lock_step
    # The depth and the FLOPs it reports count the same tokens: the FLOPs' passes are the depth.
    flops = model.realised_flops([sum(d > i for row in out.depths for d in row) / 48 for i in range(4)], 18)
    assert out.stats["mean_depth"] == pytest.approx(flops["passes"]) and sum(map(len, out.depths)) == 48
    first = generate(model, [[1, 2, 3]], max_new_tokens=1)  # one token: chosen by the prompt's passes
    assert first.stats["mean_depth"] == first.depths[0][0] and math.isfinite(first.stats["flops_x_vanilla"])
