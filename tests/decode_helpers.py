"""Shared by the decoding tests: run a sequence through a model's incremental path."""

import torch

from ponder_lightning.generate import Generation, decode_rows, generate


def decode_incrementally(model, ids: torch.Tensor, prefill: int):
    """Prefill `prefill` tokens, then decode the rest one at a time. Returns the logits and the
    depth of every position, and the cache."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    hiddens, depths = [], []
    for start, stop in [(0, prefill)] + [(t, t + 1) for t in range(prefill, ids.shape[1])]:
        chunk = ids[:, start:stop]
        h, d, _ = model.extend(chunk, torch.ones_like(chunk, dtype=torch.bool), cache)
        hiddens.append(h)
        depths.append(d)
    return model.backbone.logits(torch.cat(hiddens, 1)), torch.cat(depths, 1), cache


def decode_rowwise(
    model, ids: torch.Tensor, prefill: int, with_evaluations: bool = False, compile_attention: bool = False
):
    """Prefill `prefill` tokens, then feed the rest through the model's row decoder, each row
    starting its next (given) token as soon as its current one is done. Returns the logits and
    depth of every position after the prefill, the number of ticks (backbone calls) taken and,
    with `with_evaluations`, the decoder's backbone token-evaluations per iteration.
    `compile_attention` as in `generate`."""
    b, t = ids.shape
    cache = model.new_cache(b, t)
    cache.compile_attention = compile_attention
    model.extend(ids[:, :prefill], torch.ones(b, prefill, dtype=torch.bool, device=ids.device), cache)
    decoder = model.row_decoder(cache)
    logits: list[list[torch.Tensor]] = [[] for _ in range(b)]
    depths: list[list[int]] = [[] for _ in range(b)]
    next_col = torch.full((b,), prefill + 1, device=ids.device)

    def emit(done: torch.Tensor, step_logits: torch.Tensor, step_depth: torch.Tensor):
        for j, row in enumerate(done.tolist()):
            logits[row].append(step_logits[j])
            depths[row].append(int(step_depth[j]))
        going = done[next_col[done] < t]
        tokens = ids[going, next_col[going]]
        next_col[going] += 1
        return going, tokens

    ticks = decode_rows(decoder, torch.arange(b, device=ids.device), ids[:, prefill], emit)
    result = torch.stack([torch.stack(row) for row in logits]), torch.tensor(depths), ticks
    return result + (decoder.evaluations,) if with_evaluations else result


def assert_batch_equals_each_alone(model, vocab: int, max_new_tokens: int) -> Generation:
    """Greedy generation for ragged prompts in one batch gives each prompt's tokens and depths alone."""
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (5, 11, 1)]
    batched = generate(model, prompts, max_new_tokens=max_new_tokens)
    for i, prompt in enumerate(prompts):
        alone = generate(model, [prompt], max_new_tokens=max_new_tokens)
        assert batched.tokens[i] == alone.tokens[0]
        assert batched.depths[i] == alone.depths[0]
    return batched
