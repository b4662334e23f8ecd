"""Adaptive-depth generation for every model, on the library's own KV caches.

Models provide `new_cache(batch, max_len)` and `extend(tokens, valid, cache)`; this module only
batches prompts, samples and keeps the books.

`generate(model, prompts, ...)` left-pads a batch of prompts, prefills them iteration by
iteration (only active positions run), then decodes one token per row per step; a token that
halts after iteration j costs no backbone compute in later iterations. Finished rows stop costing
anything too: their new positions are padding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor



@dataclass
class Generation:
    """New tokens per prompt, the depth each used, and run totals."""

    tokens: list[list[int]]
    depths: list[list[int]]
    texts: list[str] | None = None
    stats: dict[str, float] = field(default_factory=dict)


def sample(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None) -> Tensor:
    """Next token per row from logits [B, V]: greedy at temperature 0, else filtered sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]] | Sequence[str],
    tokenizer=None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    seed: int | None = None,
) -> Generation:
    """Continue each prompt (token ids, or strings with `tokenizer`) by up to `max_new_tokens`.

    Stops a row at any of `stop_tokens` (default: the tokenizer's EOS, if a tokenizer is given).
    """
    model.eval()
    if prompts and isinstance(prompts[0], str):
        if tokenizer is None:
            raise ValueError("string prompts need a tokenizer")
        prompts = [tokenizer.encode(p) for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if stop_tokens is None:
        stop_tokens = [tokenizer.eos_id] if tokenizer is not None else []
    device = model.backbone.embed_in.weight.device
    b, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(b, longest, dtype=torch.long, device=device)
    valid = torch.zeros(b, longest, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):  # left padding: every row's next token lands in the same slot
        ids[row, longest - len(prompt):] = torch.tensor(list(prompt), device=device)
        valid[row, longest - len(prompt):] = True
    cache = model.new_cache(b, longest + max_new_tokens)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)

    start = time.perf_counter()
    hidden, depth, _ = model.extend(ids, valid, cache)
    prefill_seconds = time.perf_counter() - start
    last, last_depth = hidden[:, -1], depth[:, -1]
    running = torch.ones(b, dtype=torch.bool, device=device)
    new_tokens: list[list[int]] = [[] for _ in range(b)]
    depths: list[list[int]] = [[] for _ in range(b)]  # depth of the pass whose logits chose the token
    evaluations = [0] * model.n_iterations
    start = time.perf_counter()
    for step in range(max_new_tokens):
        logits = model.backbone.logits(last)
        if tokenizer is not None:  # ids of the padded vocabulary beyond the tokenizer are not text
            logits[:, tokenizer.vocab_size :] = float("-inf")
        token = sample(logits, temperature, top_k, top_p, generator)
        for row in running.nonzero().flatten().tolist():
            new_tokens[row].append(int(token[row]))
            depths[row].append(int(last_depth[row]))
        running = running & ~torch.isin(token, stops)
        if step == max_new_tokens - 1 or not running.any():
            break
        hidden, depth, counts = model.extend(token.unsqueeze(1), running.unsqueeze(1), cache)
        evaluations = [e + c for e, c in zip(evaluations, counts)]
        last, last_depth = hidden[:, -1], depth[:, -1]
    decode_seconds = time.perf_counter() - start
    n_generated = sum(len(t) for t in new_tokens)
    fractions = [e / max(evaluations[0], 1) for e in evaluations]
    stats = {
        "prompt_tokens": int(valid.sum()),
        "generated_tokens": n_generated,
        "prefill_seconds": prefill_seconds,
        "decode_seconds": decode_seconds,
        "tokens_per_second": n_generated / (prefill_seconds + decode_seconds),
        "mean_depth": sum(map(sum, depths)) / max(n_generated, 1),
        "flops_x_vanilla": model.realised_flops(fractions, cache.length)["x_vanilla"] if evaluations[0] else float("nan"),
    }
    texts = [tokenizer.decode(t) for t in new_tokens] if tokenizer is not None else None
    return Generation(tokens=new_tokens, depths=depths, texts=texts, stats=stats)
