"""Adaptive-depth generation for every model, on the library's own KV caches.

Models provide `new_cache(batch, max_len)`, `extend(tokens, valid, cache)` (prefill) and
`row_decoder(cache)` (decoding); this module only batches prompts, samples and keeps the books.

`generate(model, prompts, ...)` left-pads a batch of prompts and prefills them iteration by
iteration (only active positions run). It then decodes row-wise (`nn/rowwise.py`): each backbone
pass advances every row by one pass of its own current token, so a row whose token halts early
starts its next token at once instead of waiting for the other rows; a halted token costs no
backbone compute in later iterations. Finished rows leave the batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ponder_lightning.nn.onednn import prepacked_weights
from ponder_lightning.nn.rowwise import RowDecoder


@dataclass
class Generation:
    """New tokens per prompt, the depth each used, and run totals."""

    tokens: list[list[int]]
    depths: list[list[int]]
    texts: list[str] | None = None
    stats: dict[str, float] = field(default_factory=dict)
    #: backbone token-evaluations per iteration (or slot), for the prompt and for the new tokens
    evaluations: dict[str, list[int]] = field(default_factory=dict)
    #: decoding was stopped by Ctrl-C (KeyboardInterrupt): `tokens` are those made before it
    interrupted: bool = False


def sample(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> Tensor:
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


def decode_rows(
    decoder: RowDecoder, rows: Tensor, tokens: Tensor, emit: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
) -> int:
    """The row-wise decoding loop: `rows` start `tokens`; each tick is one backbone pass that
    advances every row in flight by one pass of its own token. When rows' tokens are done,
    `emit(rows, logits, depth)` returns the rows that go on and their next tokens. Returns the
    ticks taken."""
    decoder.start(rows, tokens)
    ticks = 0
    while rows.numel():
        step = decoder.step(rows)
        ticks += 1
        going, tokens = emit(rows[step.finished], step.logits, step.depth)
        decoder.start(going, tokens)
        rows = torch.cat([rows[~step.finished], going]).sort().values
    return ticks


def _wait_for(device: torch.device) -> None:
    """Let queued GPU work finish, so that a phase's seconds are its own (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
@prepacked_weights()
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
    compile_attention: bool = False,
) -> Generation:
    """Continue each prompt (token ids, or strings with `tokenizer`) by up to `max_new_tokens`.

    Stops a row at any of `stop_tokens` (default: the tokenizer's EOS, if a tokenizer is given).
    `compile_attention`: decode ticks whose rows are at different iterations attend to each row's
    cache where it lies, through a compiled attention, instead of copying the caches for SDPA
    (faster batched adaptive decoding; compiling takes seconds once per process).
    """
    model.eval()
    if prompts and isinstance(prompts[0], str):
        if tokenizer is None:
            raise ValueError("string prompts need a tokenizer")
        prompts = [tokenizer.encode(p) for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if stop_tokens is None:
        stop_tokens = [tokenizer.eos_id] if tokenizer is not None else []
    device = model.backbone.embed_in.weight.device
    b, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(b, longest, dtype=torch.long, device=device)
    valid = torch.zeros(b, longest, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):  # left padding: every row's next token lands in the same slot
        ids[row, longest - len(prompt) :] = torch.tensor(list(prompt), device=device)
        valid[row, longest - len(prompt) :] = True
    cache = model.new_cache(b, longest + max_new_tokens - 1)  # a row's last new token is never fed back
    cache.compile_attention = compile_attention
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)

    start = time.perf_counter()
    hidden, depth, prefill_counts = model.extend(ids, valid, cache)
    _wait_for(device)
    prefill_seconds = time.perf_counter() - start
    new_tokens: list[list[int]] = [[] for _ in range(b)]
    depths: list[list[int]] = [[] for _ in range(b)]  # depth of the pass whose logits chose the token

    def emit(rows: Tensor, logits: Tensor, depth: Tensor) -> tuple[Tensor, Tensor]:
        """Sample the next token of `rows`, record it, and return the rows that go on with it."""
        if tokenizer is not None:  # ids of the padded vocabulary beyond the tokenizer are not text
            logits[:, tokenizer.vocab_size :] = float("-inf")
        token = sample(logits, temperature, top_k, top_p, generator)
        for row, t, d in zip(rows.tolist(), token.tolist(), depth.tolist(), strict=True):
            new_tokens[row].append(t)
            depths[row].append(d)
        produced = torch.tensor([len(new_tokens[row]) for row in rows.tolist()], dtype=torch.long, device=device)
        going = ~torch.isin(token, stops) & (produced < max_new_tokens)
        return rows[going], token[going]

    start = time.perf_counter()
    decoder = model.row_decoder(cache)
    interrupted, passes = False, 0
    try:  # Ctrl-C keeps what was generated so far
        passes = decode_rows(
            decoder, *emit(torch.arange(b, device=device), model.backbone.logits(hidden[:, -1]), depth[:, -1]), emit
        )
    except KeyboardInterrupt:
        interrupted = True
    if not any(depths):
        raise KeyboardInterrupt  # interrupted before the first token: nothing to report
    _wait_for(device)
    decode_seconds = time.perf_counter() - start
    n_generated = sum(len(t) for t in new_tokens)
    # Depth and FLOPs over the same positions: those whose logits chose a generated token (the
    # prompt's last, from the prefill, and every generated token but each row's last).
    chose = [d for row in depths for d in row]
    fractions = [sum(d > i for d in chose) / len(chose) for i in range(model.n_iterations)]
    context = longest + n_generated / b
    stats = {
        "prompt_tokens": int(valid.sum()),
        "generated_tokens": n_generated,
        "prefill_seconds": prefill_seconds,
        "decode_seconds": decode_seconds,
        "decode_passes": passes,  # backbone calls while decoding: the deepest row's summed depth
        "tokens_per_second": n_generated / (prefill_seconds + decode_seconds),
        "mean_depth": sum(chose) / len(chose),
        "flops_x_vanilla": model.realised_flops(fractions, context)["x_vanilla"],
    }
    texts = [tokenizer.decode(t) for t in new_tokens] if tokenizer is not None else None
    return Generation(
        tokens=new_tokens,
        depths=depths,
        texts=texts,
        stats=stats,
        evaluations={"prefill": prefill_counts, "decode": decoder.evaluations},
        interrupted=interrupted,
    )
