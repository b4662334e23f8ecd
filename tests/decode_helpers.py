"""Shared by the decoding tests: run a sequence through a model's incremental path."""

import torch

from ponder_lightning.generate import Generation, generate


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


def assert_batch_equals_each_alone(model, vocab: int, max_new_tokens: int) -> Generation:
    """Greedy generation for ragged prompts in one batch gives each prompt's tokens and depths alone."""
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (5, 11, 1)]
    batched = generate(model, prompts, max_new_tokens=max_new_tokens)
    for i, prompt in enumerate(prompts):
        alone = generate(model, [prompt], max_new_tokens=max_new_tokens)
        assert batched.tokens[i] == alone.tokens[0]
        assert batched.depths[i] == alone.depths[0]
    return batched
