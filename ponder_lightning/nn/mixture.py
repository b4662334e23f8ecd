"""PonderLM's vocabulary mixture `softmax(h @ W.T) @ E` for training, with its softmax fused.

Autograd runs the mixture as four [tokens, vocab] passes besides the two matmuls: the softmax,
and in the backward the gradient of the probabilities and the softmax's own backward, each in a
new full-size tensor. At Pythia's 50k vocabulary on CPU those passes are a fifth of a PonderLM
step. Here the softmax runs in place in the logits' buffer (kept as the probabilities the
backward needs, as autograd keeps them), and the backward works chunk by chunk in one small
buffer: the probabilities' gradient `g = dm @ E.T`, then the softmax backward in place,
`p * (g - <g, p>)`, where `<g, p> = <dm, m>` needs no pass over the vocabulary. Same matmuls,
same result up to float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: rows of the backward's [rows, vocab] buffer: 2**24 elements (64 MB in fp32) at most
CHUNK_ELEMENTS = 2**24


class _VocabMixture(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, head: Tensor, table: Tensor) -> Tensor:  # type: ignore[override]
        probs = h @ head.T  # the logits, turned into probabilities in place
        probs = probs.sub_(probs.amax(dim=-1, keepdim=True)).exp_()
        probs = probs.div_(probs.sum(dim=-1, keepdim=True))
        mixed = probs @ table
        ctx.save_for_backward(h, head, table, probs, mixed)
        return mixed

    @staticmethod
    def backward(ctx, grad_mixed: Tensor):  # type: ignore[override]
        h, head, table, probs, mixed = ctx.saved_tensors
        need_h, need_head, need_table = ctx.needs_input_grad
        grad_h = torch.empty_like(h) if need_h else None
        grad_head = torch.zeros_like(head) if need_head else None
        grad_table = probs.T @ grad_mixed if need_table else None
        dots = (grad_mixed * mixed).sum(dim=-1, keepdim=True)  # <dm, p @ E> = <dm @ E.T, p>
        rows = max(1, CHUNK_ELEMENTS // probs.shape[1])
        for start in range(0, probs.shape[0], rows):
            stop = min(start + rows, probs.shape[0])
            grad_logits = (grad_mixed[start:stop] @ table.T).sub_(dots[start:stop]).mul_(probs[start:stop])
            if need_h:
                torch.mm(grad_logits, head, out=grad_h[start:stop])
            if need_head:
                grad_head.addmm_(grad_logits.T, h[start:stop])
        return grad_h, grad_head, grad_table


def fused_vocab_mixture(h: Tensor, head: Tensor, table: Tensor) -> Tensor:
    """`softmax(h @ head.T) @ table` for h [N, d], head [V, d], table [V, d], gradients included
    (where `fuses` holds: callers fall back to the plain ops otherwise)."""
    return _VocabMixture.apply(h, head, table)


def fuses(h: Tensor, head: Tensor, table: Tensor) -> bool:
    """Whether the fused form applies: autograd on, one full-precision dtype, no autocast (bf16
    autocast keeps autograd's form, whose probabilities are computed in fp32)."""
    return (
        torch.is_grad_enabled()
        and h.dtype == head.dtype == table.dtype
        and h.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled(h.device.type)
    )
