"""CPU matmuls for decoding, on weights packed once for oneDNN.

Decoding multiplies a few rows (one per sequence still running a pass, or the prompt tokens
still active at an iteration) by large weights: the LM head, PonderLM's vocabulary mixture, the
layers. On CPU, torch's fp32 matmuls go to MKL, which on the machine we measure on (AMD EPYC)
takes up to 5x longer for such products than on a packed weight: it repacks the weight on
every call, and some row counts hit slow kernels. Halting then saves less time than it should.
oneDNN's inner product on a weight reordered once into its blocked layout (torch's internal ops
`mkldnn._reorder_linear_weight` and `mkldnn._linear_pointwise`) costs about one read of the weight
for a single row and grows smoothly with the rows, up to prompt-sized batches
(benchmarks/RESULTS.md).

Scope: only inside `prepacked_weights()` (prefill, decode steps and `generate` enter it), with autograd off,
on CPU, in fp32; everywhere else, and where oneDNN is missing or its ops fail (they are internal
to torch), these are plain `F.linear` and `@`. Results equal those up to float rounding. Packed
weights are cached per weight tensor and repacked when it changes (its version counter or storage
moves: optimizer steps, `load_state_dict`, in-place ops on it under `torch.no_grad()`, `.data =`).
An in-place edit through `.data` (`w.data.mul_(2)`) moves neither and is not seen: edit `w`
itself under `torch.no_grad()`. The cache holds a second copy of the weights while the model
lives. Training never sees it, so sharded or replicated parameters are never packed.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable
from contextlib import ContextDecorator
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ponder_lightning.nn.torch_internals import has_packed_linear, pack_linear_weight, packed_linear, version_of

#: rows oneDNN tunes the packed layout for; one layout serves 1 to 512 rows well (measured)
ROWS_HINT = 8

_state = threading.local()
_packed: dict[tuple[int, bool], tuple[weakref.ref, int, int, Tensor]] = {}
_failures: list[str] = []  # why the packed ops failed on this machine, if they did


@cache
def available() -> bool:
    """oneDNN is built in and has the packed linear ops (any x86 or ARM build of torch 2.x)."""
    return has_packed_linear()


class prepacked_weights(ContextDecorator):
    """Within it (also as a decorator), matmuls of this module run on packed weights where they
    can. Re-entrant and per thread."""

    def __enter__(self) -> prepacked_weights:
        _state.depth = getattr(_state, "depth", 0) + 1
        return self

    def __exit__(self, *exc: Any) -> None:
        _state.depth -= 1


def _uses_packed(x: Tensor, weight: Tensor) -> bool:
    return (  # autograd first: a compiled training step then never reads the thread-local state
        not torch.is_grad_enabled()
        and getattr(_state, "depth", 0) > 0
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and available()
        and not _failures
    )


def _packed_weight(weight: Tensor, transposed: bool) -> Tensor:
    """The oneDNN-packed copy of `weight` (of `weight.T` if `transposed`), packed on first use
    and again whenever the weight has changed since."""
    key = (id(weight), transposed)
    entry = _packed.get(key)
    if entry is not None and entry[0]() is weight and entry[1:3] == (version_of(weight), weight.data_ptr()):
        return entry[3]
    source = weight.detach().t().contiguous() if transposed else weight.detach().contiguous()
    packed = pack_linear_weight(source, ROWS_HINT)

    def forget(ref: weakref.ref, key: tuple[int, bool] = key) -> None:
        if key in _packed and _packed[key][0] is ref:  # the id may belong to a newer tensor by now
            del _packed[key]

    _packed[key] = (weakref.ref(weight, forget), version_of(weight), weight.data_ptr(), packed)
    return packed


def _packed_linear(
    x: Tensor, weight: Tensor, transposed: bool, bias: Tensor | None, plain: Callable[[], Tensor]
) -> Tensor:
    """x @ W.T (W = weight, or weight.T if `transposed`) + bias on the packed copy of W; `plain()`,
    and plain ops from then on, if oneDNN fails here."""
    try:
        packed = _packed_weight(weight, transposed)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        out = packed_linear(flat, packed, None if bias is None else bias.detach())
    except RuntimeError as error:
        _failures.append(str(error))
        warnings.warn(
            f"oneDNN's packed linear failed ({error}); decoding goes on with plain matmuls",
            RuntimeWarning,
            stacklevel=3,
        )
        return plain()
    return out.reshape(*x.shape[:-1], out.shape[-1])


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`, on the packed weight when decoding on CPU."""
    if not _uses_packed(x, weight):
        return F.linear(x, weight, bias)
    return _packed_linear(x, weight, False, bias, lambda: F.linear(x, weight, bias))


def vocab_mixture(probs: Tensor, table: Tensor) -> Tensor:
    """`probs @ table` ([..., V] @ [V, d]): PonderLM's probability-weighted embedding, on the
    packed table when decoding on CPU."""
    if not _uses_packed(probs, table):
        return probs @ table
    return _packed_linear(probs, table, True, None, lambda: probs @ table)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state-dict names) whose forward runs on the packed weight
    when decoding on CPU."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
