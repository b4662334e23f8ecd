"""The one place the package reaches into torch's internals, each under a public name, checked
by tests/test_upstream.py (Lightning's are in `upstream.py`, which `nn` may not import). None has
a public form: oneDNN's packed inner product (`nn/onednn.py` says why it pays), a tensor's version
counter (how a packed copy sees its weight change), dynamo's per-function graph limit."""

from __future__ import annotations

import torch
from torch import Tensor


def has_packed_linear() -> bool:
    """Whether this torch build has oneDNN's packed inner product."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack_linear_weight(weight: Tensor, rows_hint: int) -> Tensor:
    """`weight` [out, in] reordered into oneDNN's blocked layout for products of ~`rows_hint` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """x [rows, in] @ W.T + bias on a weight packed by `pack_linear_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def version_of(tensor: Tensor) -> int:
    """The tensor's version counter: it moves with every in-place change (not through `.data`)."""
    return tensor._version


def allow_compiled_graphs(count: int) -> None:
    """Let dynamo keep `count` graphs per compiled function (torch's default is 8)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, count)
