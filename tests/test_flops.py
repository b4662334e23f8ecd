"""The analytic FLOPs (`ponder_lightning/flops.py`) against torch's `FlopCounterMode`, which counts
the matmuls and attention a forward actually runs: one forward of each model family at full
depth, and a prefill at the depth its tokens actually ran (the "FLOPs at the depth run" claim).

FlopCounterMode has no formula for the CPU flash-attention op SDPA takes on CPU, nor for the
oneDNN linear decoding runs on CPU, so the test gives it torch's own SDPA formula
(`sdpa_flop_count`) and 2 x rows x in x out for those two ops.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ponder_lightning import flops
from ponder_lightning.gates import MatchedRandomPruning
from ponder_lightning.models import AdaPonderLM, LoopTransformer, PonderLM, PonderLM2, PonderLM3, VanillaLM
from ponder_lightning.nn.backbone import KEY_BIAS_DIMS

B, T, VOCAB = 2, 32, 512
TOLERANCE = 0.05  # the analytic count leaves out norms, activations, softmaxes and the gate's sigmoid


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)  # FlopCounterMode hands formulas the shapes


def _onednn_linear_flops(x, *args, out_shape=None, **kwargs) -> int:
    """Decoding's CPU matmuls on oneDNN-prepacked weights (`nn/onednn.py`): x [n, in] -> [n, out]."""
    return 2 * x[0] * x[1] * out_shape[-1]


def counted_flops(run) -> int:
    mapping = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
        torch.ops.mkldnn._linear_pointwise: _onednn_linear_flops,
    }
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        run()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (VanillaLM, {}),
        (PonderLM, {}),
        (PonderLM, {"mixture_top_k": 16}),
        (LoopTransformer, {"input_injection": True}),
        (AdaPonderLM, {}),
        (VanillaLM, {"size": "llama-tiny"}),
        (PonderLM, {"size": "llama-tiny"}),
    ],
    ids=lambda x: x.__name__ if isinstance(x, type) else ",".join(f"{k}={v}" for k, v in x.items()) or "default",
)
def test_token_recurrent_forward_matches_the_counter(cls, kwargs):
    torch.manual_seed(0)
    model = cls(**{"size": "tiny", "vocab_size": VOCAB, **kwargs}).eval()
    ids = torch.randint(0, VOCAB, (B, T))
    got = counted_flops(lambda: model(ids))
    expected = model.full_depth_flops_per_token(T) * B * T
    assert got == pytest.approx(expected, rel=TOLERANCE)


@pytest.mark.parametrize("cls, latent_steps", [(PonderLM2, 1), (PonderLM2, 2), (PonderLM3, 3)])
def test_latent_forward_matches_the_counter(cls, latent_steps):
    """The Jacobi training form: build-up passes, J Jacobi passes and a final pass over K+1 slots."""
    torch.manual_seed(0)
    model = cls(size="llama-tiny", vocab_size=VOCAB, latent_steps=latent_steps).eval()
    ids = torch.randint(0, VOCAB, (B, T))
    got = counted_flops(lambda: model(ids))
    jacobi, router = model.hparams.jacobi_eval, model.latent.router
    router_flops = router.extra_flops_per_token() if router is not None else 0.0
    per_token = flops.latent_training_forward_flops(model.config, T, latent_steps, jacobi, router_flops)
    if router is not None:
        # PonderLM-3's log w bias rides in KEY_BIAS_DIMS extra head dims of SDPA (so that flash
        # attention runs on GPUs) in every pass after the first: kernel FLOPs that the analytic
        # count (the model's FLOPs) leaves out. Added here, or the comparison would not be fair.
        widths = list(range(1, latent_steps + 1)) + [latent_steps + 1] * (jacobi + 1)
        attention = sum(
            w * (flops.stack_flops(model.config, T * w) - flops.stack_flops(model.config, 0)) for w in widths[1:]
        )
        per_token += attention * KEY_BIAS_DIMS / model.config.head_dim
    assert got == pytest.approx(per_token * B * T, rel=TOLERANCE)


def test_prefill_flops_follow_the_depth_actually_run():
    """A prefill where tokens halt costs what `realised_flops` says at the fractions that really
    ran (the gathered form: a halted token costs nothing in later iterations)."""
    torch.manual_seed(0)
    model = AdaPonderLM(size="tiny", vocab_size=VOCAB).eval()
    ids = torch.randint(0, VOCAB, (1, T))  # one row: no padding entries in the gathered batch
    gate = MatchedRandomPruning(model.gate, [1.0, 0.75, 0.5, 0.25], seed=0)
    cache = model.new_cache(1, T)
    result = {}

    def prefill() -> None:
        hidden, _, evaluations = model.recurrence.extend(ids, torch.ones_like(ids, dtype=torch.bool), cache, gate)
        model.backbone.logits(hidden)  # the LM head, once per token, as in the analytic count
        result["fractions"] = [e / evaluations[0] for e in evaluations]

    got = counted_flops(prefill)
    fractions = result["fractions"]
    assert fractions[-1] < 0.6, "the control must halt tokens for this test to mean anything"
    expected = model.realised_flops(fractions, T)["x_vanilla"] * flops.vanilla_forward_flops(model.config, T) * T
    assert got == pytest.approx(expected, rel=TOLERANCE)
