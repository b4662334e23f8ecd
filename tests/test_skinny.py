"""The decode-time matmuls for a few rows equal the plain ones, in every shape they are used with."""

import pytest
import torch
import torch.nn.functional as F

from ponder_lightning.nn import skinny


@pytest.fixture(autouse=True)
def up_to_16_rows(monkeypatch):
    """The row limit follows the thread count; fix it so that every case below takes its path."""
    monkeypatch.setattr(skinny, "max_rows", lambda: 16)


@pytest.mark.parametrize("rows", [1, 3, 7, 16, 40])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_f_linear(rows, bias):
    weight, b = torch.randn(300, 48), torch.randn(300) if bias else None
    x = torch.randn(rows, 1, 48)
    with torch.no_grad():
        got = skinny.linear(x, weight, b)
    assert got.shape == (rows, 1, 300)
    assert torch.allclose(got, F.linear(x, weight, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 12])
@pytest.mark.parametrize("vocab", [4096, 5000, 50304])
def test_vocab_mixture_equals_matmul(rows, vocab):
    probs, table = torch.randn(rows, vocab).softmax(-1), torch.randn(vocab, 32)
    with torch.no_grad():
        got = skinny.vocab_mixture(probs, table)
    assert torch.allclose(got, probs @ table, atol=1e-5, rtol=1e-5)


def test_skinny_forms_only_without_autograd(monkeypatch):
    """Training keeps the plain ops (and their gradients); inference on a few rows switches."""
    calls = []
    monkeypatch.setattr(skinny.torch, "addmm", lambda *a, **k: calls.append(1) or torch.ops.aten.addmm(*a, **k))
    layer = skinny.Linear(8, 4)
    x = torch.randn(2, 8, requires_grad=True)
    layer(x).sum().backward()
    assert not calls and layer.weight.grad is not None
    with torch.no_grad():
        layer(x)
    assert calls == [1]
