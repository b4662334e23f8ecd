"""Decoding's matmuls on oneDNN-packed weights equal the plain ones, follow every change of the
weights, and stay out of training."""

import gc

import pytest
import torch
import torch.nn.functional as F

from ponder_lightning.nn import onednn


def packed_entries(weight: torch.Tensor) -> int:
    return sum(1 for (ident, _) in onednn._packed if ident == id(weight))


def test_this_torch_build_has_the_packed_ops():
    """The suite below only means something where oneDNN is built in (every x86 build of torch)."""
    assert onednn.available()


@pytest.mark.parametrize("rows", [1, 3, 7, 16, 40, 513])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_f_linear(rows, bias):
    weight, b = torch.randn(300, 48), torch.randn(300) if bias else None
    x = torch.randn(rows, 1, 48)
    with torch.no_grad(), onednn.prepacked_weights():
        got = onednn.linear(x, weight, b)
    assert packed_entries(weight) == 1, "the packed path must have run"
    assert got.shape == (rows, 1, 300)
    assert torch.allclose(got, F.linear(x, weight, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 64])
@pytest.mark.parametrize("vocab", [4096, 5000, 50304])
def test_vocab_mixture_equals_matmul(rows, vocab):
    probs, table = torch.randn(rows, vocab).softmax(-1), torch.randn(vocab, 32)
    with torch.no_grad(), onednn.prepacked_weights():
        got = onednn.vocab_mixture(probs, table)
    assert packed_entries(table) == 1
    assert torch.allclose(got, probs @ table, atol=1e-5, rtol=1e-5)


def test_packed_weights_follow_every_change_of_the_weight():
    """In-place updates (optimizer steps, load_state_dict) and `.data =` swaps repack the weight."""
    layer = onednn.Linear(16, 8)
    x = torch.randn(3, 16)
    with torch.no_grad(), onednn.prepacked_weights():
        layer(x)
        layer.weight.mul_(2.0)
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5)
        layer.load_state_dict({"weight": torch.randn(8, 16), "bias": torch.randn(8)})
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5)
        layer.weight.data = torch.randn(8, 16)
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5)
    assert packed_entries(layer.weight) == 1


def test_a_deleted_weight_frees_its_packed_copy():
    layer = onednn.Linear(16, 8)
    with torch.no_grad(), onednn.prepacked_weights():
        layer(torch.randn(2, 16))
    ident = id(layer.weight)
    assert packed_entries(layer.weight) == 1
    del layer
    gc.collect()
    assert not any(key[0] == ident for key in onednn._packed)


def test_plain_ops_outside_decoding_with_autograd_or_in_other_dtypes():
    """Training keeps the plain ops and their gradients; no-grad code that is not decoding (e.g.
    validation, whose weights may be sharded) never packs; nor do dtypes other than fp32."""
    layer = onednn.Linear(8, 4)
    x = torch.randn(2, 8, requires_grad=True)
    with onednn.prepacked_weights():
        layer(x).sum().backward()
    assert layer.weight.grad is not None
    with torch.no_grad():
        layer(x)
    assert packed_entries(layer.weight) == 0
    weight64 = layer.weight.detach().double()
    with torch.no_grad(), onednn.prepacked_weights():
        got = onednn.linear(x.detach().double(), weight64)
    assert packed_entries(weight64) == 0 and got.dtype == torch.float64


def test_a_failing_packed_op_falls_back_to_plain_matmuls(monkeypatch):
    """The packed ops are internal to torch: if they fail on some machine, decoding warns once and
    goes on with the plain ops, with the same results."""

    def broken(*args, **kwargs):
        raise RuntimeError("no oneDNN kernel for this CPU")

    monkeypatch.setattr(onednn, "_packed_weight", broken)
    monkeypatch.setattr(onednn, "_failures", [])
    weight, x = torch.randn(8, 16), torch.randn(3, 16)
    with torch.no_grad(), onednn.prepacked_weights():
        with pytest.warns(RuntimeWarning, match="no oneDNN kernel"):
            got = onednn.linear(x, weight)
        assert torch.equal(got, F.linear(x, weight))
        assert not onednn._uses_packed(x, weight)
