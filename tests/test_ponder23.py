"""LLaMA block equals transformers; PonderLM-2/3: the Jacobi training form equals exact sequential
decoding once J is large enough (and the gap at the paper's J is measured), PonderLM-3's pruned
inference equals the soft-masked training form when the router is saturated, causality, router
gradients, generation and the CLI."""

import math

import pytest
import torch
from decode_helpers import assert_batch_equals_each_alone, decode_incrementally, decode_rowwise
from fit_helpers import tiny_fit
from transformers import LlamaForCausalLM

from ponder_lightning.cli import run_lightning_cli
from ponder_lightning.models import PonderLM2, PonderLM3
from ponder_lightning.nn import Backbone, backbone_config, causal_mask, positions_from_valid
from ponder_lightning.nn.hf import load_hf_backbone, read_hf_config, save_hf_backbone

VOCAB = 256


# -- LLaMA block ---------------------------------------------------------------------------------
def test_llama_logits_equal_transformers(tmp_path):
    ours = Backbone(backbone_config("llama-tiny", vocab_size=384))
    ours.init_weights()
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 1:  # RMSNorm weights: random, so no term is trivially one
                p.normal_(1.0, 0.2)
    save_hf_backbone(ours.eval(), tmp_path / "hf")
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    loaded = load_hf_backbone(tmp_path / "hf").eval()  # HF -> ours as well as ours -> HF
    assert read_hf_config(tmp_path / "hf") == ours.config
    ids = torch.randint(0, 384, (3, 20))
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[0, :7] = False
    positions = positions_from_valid(valid)
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        got = loaded.logits(loaded(loaded.embed_in(ids)))
        expected_padded = theirs(input_ids=ids, attention_mask=valid.long(), position_ids=positions).logits
        got_padded = loaded.logits(loaded(loaded.embed_in(ids), positions=positions, mask=causal_mask(valid)))
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    assert torch.allclose(got_padded[valid], expected_padded[valid], atol=1e-5, rtol=0)


# -- helpers -------------------------------------------------------------------------------------
def teacher_forced(model, ids: torch.Tensor, jacobi: int):
    with torch.no_grad():
        hidden, trace = model.latent(ids, None, jacobi)
    return model.backbone.logits(hidden), trace


def saturated_ponder3() -> PonderLM3:
    """A router so sharp that s is exactly one-hot (w exactly 0 or 1), depending on the token; on the
    LLaMA block, as PonderLM-3 is trained (the decode cache works through the same K/V hook)."""
    model = PonderLM3(size="llama-tiny", vocab_size=VOCAB).eval()
    with torch.no_grad():
        model.router.net.weight.normal_(0, 1000.0)  # one-hot in float32 at the LLaMA init (R = 1)
        model.router.net.bias.zero_()
    return model


# -- Jacobi training form vs sequential decoding ---------------------------------------------------
def sharpened(model, scale: float):
    """Scale the backbone's matrices: at random init the Jacobi map is nearly a contraction (J = 4
    already looks exact), at scale 4 latents matter and Jacobi needs nearly its T*K bound."""
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(scale)
    return model


@pytest.mark.parametrize(
    "cls, latent_steps, length, scale",
    [(PonderLM2, 1, 10, 1.0), (PonderLM2, 1, 10, 4.0), (PonderLM2, 2, 8, 4.0), (PonderLM3, 3, 6, 4.0)],
)
def test_jacobi_training_form_converges_to_sequential_decoding(cls, latent_steps, length, scale):
    model = sharpened(cls(size="tiny", vocab_size=VOCAB, latent_steps=latent_steps).eval(), scale)
    ids = torch.randint(0, VOCAB, (2, length))
    expected, depth, _ = decode_incrementally(model, ids, prefill=3)
    assert torch.equal(depth, torch.full_like(depth, latent_steps + 1))  # PonderLM-3's soft router prunes nothing here
    bound = length * latent_steps  # J >= number of latents: exact
    gaps = {j: (teacher_forced(model, ids, j)[0] - expected).abs().max().item() for j in (0, 1, 2, 3, bound)}
    print(
        f"\n{cls.__name__} K={latent_steps} T={length} weights x{scale:g}: max |logit gap| to sequential decoding: "
        + ", ".join(f"J={j}: {g:.1e}" for j, g in gaps.items())
    )
    assert gaps[bound] <= 1e-5
    assert all(math.isfinite(g) for g in gaps.values())
    assert gaps[0] > gaps[3] > gaps[bound], "more Jacobi passes must lower the gap"
    if scale > 1:
        assert gaps[3] > 1e-4, "the paper's J should not be exact on this model, else the test proves little"


def test_ponder2_jacobi_count_drawn_per_step_and_fixed_at_eval():
    model = PonderLM2(size="tiny", vocab_size=VOCAB, jacobi_choices=(2, 3), jacobi_eval=3)
    model.train()
    assert model.jacobi_passes() in (2, 3)
    assert model.jacobi_passes() == model.jacobi_passes()  # a function of the step: every rank agrees
    model.eval()
    assert model.jacobi_passes() == 3


# -- PonderLM-3 ----------------------------------------------------------------------------------
def test_ponder3_saturated_router_equals_pruned_inference():
    model = saturated_ponder3()
    ids = torch.randint(0, VOCAB, (2, 8))
    expected, depth, cache = decode_incrementally(model, ids, prefill=3)
    got, trace = teacher_forced(model, ids, jacobi=ids.shape[1] * 3)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    assert torch.equal(depth, trace.depth())
    assert len(depth.unique()) >= 3, (
        f"tokens should use different numbers of latent steps, got {depth.unique().tolist()}"
    )
    assert torch.equal(cache.fill, depth.sum(1)), "pruned slots must not enter the KV cache"
    for w in trace.scores:
        assert torch.all((w == 0) | (w == 1))


@pytest.mark.parametrize("compile_attention", [False, True])
@pytest.mark.parametrize("cls", [PonderLM2, saturated_ponder3])
def test_rowwise_decoding_equals_sequential(cls, compile_attention):
    """Each pass runs every row's own next slot, so rows whose router prunes run ahead; logits,
    slots used and the cache contents match token-by-token decoding, and the passes taken are the
    busiest row's slots; also with the compiled in-place attention (key bias as an additive mask)."""
    model = cls(size="tiny", vocab_size=VOCAB).eval() if cls is PonderLM2 else cls()
    ids = torch.randint(0, VOCAB, (3, 12))
    expected, depth, cache = decode_incrementally(model, ids, prefill=4)
    got, got_depth, ticks, evaluations = decode_rowwise(
        model, ids, prefill=4, with_evaluations=True, compile_attention=compile_attention
    )
    assert torch.allclose(got, expected[:, 4:], atol=1e-5, rtol=0), (got - expected[:, 4:]).abs().max()
    assert torch.equal(got_depth, depth[:, 4:])
    assert ticks == int(got_depth.sum(1).max()) and sum(evaluations) == int(got_depth.sum())
    if cls is not PonderLM2:
        assert len(got_depth.sum(1).unique()) > 1, "rows should use different numbers of slots"


def test_ponder3_constant_router_prunes_every_token_alike():
    """The brief's saturation: router weights 0, biases +-large: s = one-hot at k=1 for every token."""
    model = PonderLM3(size="tiny", vocab_size=VOCAB).eval()
    with torch.no_grad():
        model.router.net.weight.zero_()
        model.router.net.bias.copy_(torch.tensor([-1e4, 1e4, -1e4, -1e4]))
    ids = torch.randint(0, VOCAB, (2, 8))
    expected, depth, _ = decode_incrementally(model, ids, prefill=1)
    got, trace = teacher_forced(model, ids, jacobi=ids.shape[1])  # one visible latent per token
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert torch.all(depth == 2) and torch.equal(depth, trace.depth())


@pytest.mark.parametrize("cls", [PonderLM2, PonderLM3])
def test_causality(cls):
    model = cls(size="tiny", vocab_size=VOCAB).eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    changed = ids.clone()
    changed[:, 9:] = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_ponder3_router_gets_gradient_from_cross_entropy_and_penalty():
    model = PonderLM3(size="tiny", vocab_size=VOCAB)
    batch = torch.randint(0, VOCAB, (2, 13))
    ce, _, trace = model.training_loss(batch)
    ce.backward()
    grad = model.router.net.weight.grad
    assert grad is not None and grad.abs().sum() > 0 and torch.isfinite(grad).all()
    model.zero_grad()
    penalised = PonderLM3(size="tiny", vocab_size=VOCAB, depth_penalty=0.1)
    _, _, trace = penalised.training_loss(batch)
    aux = penalised.aux_loss(trace)
    expected_steps = torch.stack(trace.scores).sum(0).mean()
    assert torch.allclose(aux, 0.1 * expected_steps)
    aux.backward()
    assert penalised.router.net.weight.grad.abs().sum() > 0


def test_ponder3_left_padding_changes_nothing():
    model = PonderLM3(size="tiny", vocab_size=VOCAB).eval()
    ids = torch.randint(0, VOCAB, (1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    valid = torch.cat([torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 9, dtype=torch.bool)], 1)
    with torch.no_grad():
        alone, padded_out = model(ids), model(padded, valid)
    assert torch.isfinite(padded_out).all()
    assert torch.allclose(padded_out[:, 4:], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [PonderLM2, saturated_ponder3])
def test_generate_batch_of_ragged_prompts_equals_each_alone(cls):
    model = cls(size="tiny", vocab_size=VOCAB) if cls is PonderLM2 else cls()
    batched = assert_batch_equals_each_alone(model, VOCAB, max_new_tokens=6)
    assert batched.stats["flops_x_vanilla"] > 1


# -- CLI -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["ponderlm2", "ponderlm3"])
def test_config_fits_with_fast_dev_run(tmp_path, config):
    """Two training steps of the shipped config through the CLI: both ran, the loss is finite."""
    cli = run_lightning_cli(
        ["fit", *tiny_fit(config), "--trainer.fast_dev_run", "2", "--trainer.default_root_dir", str(tmp_path)]
    )
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
