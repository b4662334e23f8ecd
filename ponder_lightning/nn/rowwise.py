"""Row-wise decoding: every row of a batch walks through its own token's iterations at its own pace.

Decoding in lock-step (every row runs iteration i of its current token before any row runs
iteration i+1) only saves time when a whole iteration is skipped by every row, because a decode
pass over a small batch costs about the same for 8 rows as for 3: it is bound by reading the
weights. But every iteration runs the *same* weights, so one backbone call can advance each row by
one pass of whatever it is doing: row A its token's third iteration, row B the first iteration of
its next token, because B's previous token halted early. A batch then spends one backbone call
per tick, and the ticks a row needs are the passes its tokens actually ran: halting shortens the
generation even when rows halt at different iterations.

Each pass reads the cache of the row's own iteration; a token that finishes after iteration j has
its K/V copied into every later iteration's cache at once, exactly what lock-step decoding and
the training-time KV alignment give it, so results are identical.

A model's row decoder (`RowDecoder`) offers `start(rows, tokens)` and `step(rows) -> RowStep`;
`generate.decode_rows` runs the ticks, `generate` the sampling. `RecurrenceRowDecoder` runs the
token recurrence's own iteration step (`Recurrence.step`) on one token per row;
`nn/latent.py` has the latent-slot models' decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ponder_lightning.nn.cache import CacheWriter, KVCache
from ponder_lightning.nn.gate import Gate
from ponder_lightning.nn.onednn import prepacked_weights
from ponder_lightning.nn.recurrence import Recurrence


@dataclass
class RowStep:
    """What one tick did for the rows it ran: `finished` [n] marks rows whose token is done;
    `hidden` [n_finished, d] are those tokens' final hidden states, `depth` [n_finished] the
    passes each ran, and `logits` [n_finished, V] their next-token logits (None when the step
    was asked not to compute them)."""

    finished: Tensor
    hidden: Tensor
    depth: Tensor
    logits: Tensor | None = None


class RowDecoder:
    """What both row decoders share: the cache, and the backbone token-evaluations per iteration
    (or slot) of every pass they ran."""

    def __init__(self, cache: KVCache, n_iterations: int) -> None:
        self.cache = cache
        self.evaluations = [0] * n_iterations

    def start(self, rows: Tensor, tokens: Tensor) -> None:
        """Rows `rows` begin new tokens `tokens` [n]."""
        raise NotImplementedError

    def step(self, rows: Tensor, with_logits: bool = True) -> RowStep:
        """One backbone pass for each of `rows`, each at its own token's next pass."""
        raise NotImplementedError

    def tally(self, iteration: Tensor) -> None:
        for i, count in enumerate(torch.bincount(iteration, minlength=len(self.evaluations)).tolist()):
            self.evaluations[i] += count


class RecurrenceRowDecoder(RowDecoder):
    """Row-wise decoding for `Recurrence` models (vanilla, PonderLM, LoopTransformer, AdaPonderLM)
    on a prefilled `KVCache`; each row's slots continue from its own fill."""

    def __init__(self, recurrence: Recurrence, cache: KVCache, gate: Gate) -> None:
        super().__init__(cache, recurrence.n_iterations)
        self.recurrence, self.gate = recurrence, gate
        b, device = cache.batch, cache.key_valid.device
        d, dtype = recurrence.backbone.config.d_model, recurrence.backbone.embed_in.weight.dtype
        self.slot = torch.zeros(b, dtype=torch.long, device=device)
        self.position = torch.zeros(b, dtype=torch.long, device=device)
        self.iteration = torch.zeros(b, dtype=torch.long, device=device)
        self.token = torch.zeros(b, dtype=torch.long, device=device)
        self.embeds = torch.zeros(b, d, dtype=dtype, device=device)
        self.state = torch.zeros(b, d, dtype=dtype, device=device)

    def start(self, rows: Tensor, tokens: Tensor) -> None:
        """Rows `rows` begin new tokens `tokens` [n] at iteration 0, in their next cache slot."""
        self.slot[rows] = self.cache.claim(rows)
        self.position[rows] = self.cache.n_real[rows]
        self.cache.n_real[rows] += 1
        self.iteration[rows] = 0
        self.token[rows] = tokens
        embeds = self.recurrence.backbone.embed(tokens)
        self.embeds[rows] = embeds
        self.state[rows] = self.recurrence.feedback.initial(embeds)

    @torch.no_grad()
    @prepacked_weights()
    def step(self, rows: Tensor, with_logits: bool = True) -> RowStep:
        iteration, slot = self.iteration[rows], self.slot[rows]
        one_iteration = bool((iteration == iteration[0]).all())
        current = int(iteration[0]) if one_iteration else iteration
        total_len = int(slot.max()) + 1
        writer = CacheWriter(self.cache, current, rows, slot.unsqueeze(1), total_len)
        mask = self.cache.attention_mask(rows, slot.unsqueeze(1), total_len)
        # one token per row: [n, 1, ...]
        state, embeds, tokens, positions = (
            x[rows].unsqueeze(1) for x in (self.state, self.embeds, self.token, self.position)
        )
        ones = torch.ones_like(tokens, dtype=torch.bool)
        step = self.recurrence.step(
            self.gate,
            state,
            embeds,
            current,
            tokens,
            positions,
            ones,
            mask,
            writer,
            gathered=True,
            keep_logits=with_logits,
        )
        self.tally(iteration)
        finished = ones[:, 0] if step.go is None else ~step.go[:, 0]
        continuing = rows[~finished]
        if continuing.numel():
            self.state[continuing] = step.state
            self.iteration[continuing] += 1
        done = finished.nonzero().squeeze(1)
        done_rows, done_iteration, done_slot = rows[done], iteration[done], slot[done]
        for i in range(1, self.recurrence.n_iterations):  # a finished token's K/V stand in for it in later iterations
            later = done_iteration < i
            self.cache.inherit(i, done_rows[later], done_slot[later])
        hidden = step.h[done, 0]
        logits = None
        if with_logits:
            logits = step.logits[done, 0] if step.logits is not None else self.recurrence.backbone.logits(hidden)
        return RowStep(finished=finished, hidden=hidden, depth=done_iteration + 1, logits=logits)
