"""PonderLM's fused training mixture (`nn/mixture.py`) equals autograd's softmax-times-table, values
and gradients, alone and inside a PonderLM training step."""

import pytest
import torch

import ponder_lightning.nn.recurrence as recurrence
from ponder_lightning.models import PonderLM
from ponder_lightning.nn.mixture import fused_vocab_mixture, fuses


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fused_mixture_equals_autograd(dtype, tol, monkeypatch):
    monkeypatch.setattr("ponder_lightning.nn.mixture.CHUNK_ELEMENTS", 7 * 300)  # several backward chunks
    torch.manual_seed(0)
    h, head, table = (torch.randn(n, 16, dtype=dtype, requires_grad=True) for n in (37, 300, 300))
    grad_out = torch.randn(37, 16, dtype=dtype)
    expected = (h @ head.T).softmax(-1) @ table
    expected_grads = torch.autograd.grad(expected, (h, head, table), grad_out)
    got = fused_vocab_mixture(h, head, table)
    grads = torch.autograd.grad(got, (h, head, table), grad_out)
    assert torch.allclose(got, expected, atol=tol, rtol=0)
    for g, e in zip(grads, expected_grads, strict=True):
        assert torch.allclose(g, e, atol=tol * 10, rtol=0)


def test_fused_only_where_it_applies():
    x = torch.randn(2, 4)
    assert fuses(x, x, x)
    with torch.no_grad():
        assert not fuses(x, x, x)  # decoding keeps the oneDNN path
    assert not fuses(x.bfloat16(), x.bfloat16(), x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fuses(x, x, x)


def test_ponderlm_step_is_the_same_with_the_fused_mixture(monkeypatch):
    torch.manual_seed(0)
    model = PonderLM(size="tiny", vocab_size=64, pondering_steps=2)
    batch = torch.randint(0, 64, (2, 17))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model.training_loss(batch)[0]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    fused_loss, fused_grads = loss_and_grads()
    monkeypatch.setattr(recurrence, "fuses", lambda *args: False)
    plain_loss, plain_grads = loss_and_grads()
    assert torch.allclose(fused_loss, plain_loss, atol=1e-6, rtol=0)
    for f, p in zip(fused_grads, plain_grads, strict=True):
        assert torch.allclose(f, p, atol=1e-6, rtol=1e-4)


def test_the_decoding_mixture_keeps_double_precision():
    """Outside training (no grad: the oneDNN path) an fp64 model's softmax runs in fp64, so fp64
    reference checks compare at fp64 precision; lower precisions are raised to fp32."""
    torch.manual_seed(0)
    model = PonderLM(size="tiny", vocab_size=64).double()
    backbone = model.backbone
    h = torch.randn(3, 5, backbone.config.d_model, dtype=torch.float64)
    expected = backbone.logits(h).softmax(-1) @ backbone.embed_in.weight * backbone.embed_scale
    with torch.no_grad():
        got = recurrence.PonderFeedback().mixture(backbone, recurrence.PassOutput(h, h))
    assert got.dtype == torch.float64
    assert torch.allclose(got, expected, atol=1e-12, rtol=0)
