"""Matmuls for the few rows of a decode step on CPU.

Decoding multiplies a handful of rows (one per sequence still running this pass) by large weight
matrices. On CPU, `x @ W.T` with few rows can take 2-6x longer than reading W once would (measured
with torch 2.13's MKL on an AMD EPYC: the library packs the whole weight for every call, and some
row counts, e.g. 3 and 7, hit much slower kernels than their neighbours). Halting then does not
save the time it should, because dropping from 8 rows to 3 can make a pass slower. The same
products computed as `(W @ x.T).T`, with the weight as the streamed left operand, and the
vocabulary mixture as a batch of matmuls over vocabulary chunks, cost about one read of the weight
at every row count (benchmarks/RESULTS.md).

Used only where it pays: CPU, no autograd, and at most `max_rows()` rows; everywhere else (training,
GPUs, long prompts) these are plain `F.linear` and `@`. Results equal those up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: vocabulary rows per chunk of the mixture's batched matmul
MIXTURE_CHUNK = 2048


def max_rows() -> int:
    """The most rows for which the skinny forms are used: they win up to about 4 rows per thread
    on the machine they were measured on (beyond that, packing the weight pays for itself)."""
    return min(16, 4 * torch.get_num_threads())


def _few_rows(x: Tensor, rows: int) -> bool:
    return x.device.type == "cpu" and not torch.is_grad_enabled() and rows <= max_rows()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`, as `(weight @ x.T).T` for a few rows on CPU."""
    rows = x.numel() // x.shape[-1]
    if not _few_rows(x, rows):
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1]).t()
    out = torch.mm(weight, flat) if bias is None else torch.addmm(bias.unsqueeze(1), weight, flat)
    return out.t().reshape(*x.shape[:-1], weight.shape[0])


def vocab_mixture(probs: Tensor, table: Tensor) -> Tensor:
    """`probs @ table` ([..., V] @ [V, d]), for a few rows on CPU as one batched matmul over
    vocabulary chunks whose partial sums are added."""
    v, d = table.shape
    rows = probs.numel() // v
    n_chunks = v // MIXTURE_CHUNK
    if not _few_rows(probs, rows) or n_chunks < 2:
        return probs @ table
    flat = probs.reshape(rows, v)
    split = n_chunks * MIXTURE_CHUNK
    chunks = flat[:, :split].reshape(rows, n_chunks, MIXTURE_CHUNK).transpose(0, 1)
    out = torch.bmm(chunks, table[:split].view(n_chunks, MIXTURE_CHUNK, d)).sum(0)
    if split < v:
        out.addmm_(flat[:, split:], table[split:])
    return out.reshape(*probs.shape[:-1], d)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state-dict names) whose forward takes the skinny form for a
    few rows on CPU without autograd."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
