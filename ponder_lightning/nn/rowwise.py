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

A model's row decoder offers `start(rows, tokens)` and `step(rows) -> RowStep`; `generate` runs the
ticks and the sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ponder_lightning.gates.base import Gate
from ponder_lightning.nn.cache import CacheWriter, KVCache
from ponder_lightning.nn.packed import decoding
from ponder_lightning.nn.recurrence import Recurrence, feedback_weight


@dataclass
class RowStep:
    """What one tick did for the rows it ran: `finished` [n] marks rows whose token is done,
    `logits` [n_finished, V] are those tokens' next-token logits and `depth` [n_finished] the
    passes each of them ran."""

    finished: Tensor
    logits: Tensor
    depth: Tensor


class RecurrenceRowDecoder:
    """Row-wise decoding for `Recurrence` models (vanilla, PonderLM, LoopTransformer, AdaPonderLM)
    on a prefilled `KVCache`; each row's slots continue from the cache's length."""

    def __init__(self, recurrence: Recurrence, cache: KVCache, gate: Gate) -> None:
        self.recurrence, self.cache, self.gate = recurrence, cache, gate
        self.backbone, self.feedback = recurrence.backbone, recurrence.feedback
        b, device = cache.key_valid.shape[0], cache.key_valid.device
        d = self.backbone.config.d_model
        dtype = self.backbone.embed_in.weight.dtype
        self.next_slot = torch.full((b,), cache.length, dtype=torch.long, device=device)
        self.slot = torch.zeros(b, dtype=torch.long, device=device)
        self.position = torch.zeros(b, dtype=torch.long, device=device)
        self.iteration = torch.zeros(b, dtype=torch.long, device=device)
        self.token = torch.zeros(b, dtype=torch.long, device=device)
        self.embeds = torch.zeros(b, d, dtype=dtype, device=device)
        self.state = torch.zeros(b, d, dtype=dtype, device=device)
        self.evaluations = [0] * recurrence.n_iterations

    def start(self, rows: Tensor, tokens: Tensor) -> None:
        """Rows `rows` begin new tokens `tokens` [n] at iteration 0, in their next cache slot."""
        if rows.numel() and int(self.next_slot[rows].max()) >= self.cache.max_len:
            raise ValueError(f"KV cache full: its {self.cache.max_len} slots are used")
        self.slot[rows] = self.next_slot[rows]
        self.next_slot[rows] += 1
        self.cache.key_valid[rows, self.slot[rows]] = True
        self.position[rows] = self.cache.n_real[rows]
        self.cache.n_real[rows] += 1
        self.iteration[rows] = 0
        self.token[rows] = tokens
        embeds = self.backbone.embed_in(tokens)
        if self.recurrence.embed_scale != 1.0:
            embeds = embeds * self.recurrence.embed_scale
        self.embeds[rows] = embeds
        self.state[rows] = self.feedback.initial(embeds)

    @torch.no_grad()
    @decoding()
    def step(self, rows: Tensor) -> RowStep:
        """One backbone pass for each of `rows`, each at its own token's next iteration."""
        n_iterations = self.recurrence.n_iterations
        iteration, slot, position = self.iteration[rows], self.slot[rows], self.position[rows]
        total = int(slot.max()) + 1
        one_iteration = bool((iteration == iteration[0]).all())
        writer = CacheWriter(self.cache, int(iteration[0]) if one_iteration else iteration, rows, slot.unsqueeze(1), total, all_rows=rows.numel() == self.slot.numel())
        mask = (torch.arange(total, device=rows.device) <= slot.unsqueeze(1)) & self.cache.key_valid[rows, :total]
        x = self.feedback.inputs(self.state[rows], self.embeds[rows], int(iteration[0]) if one_iteration else iteration)
        h_raw = self.backbone(x.unsqueeze(1), position.unsqueeze(1), mask[:, None, None], kv_hook=writer, final_norm=False)[:, 0]
        h = self.backbone.final_layer_norm(h_raw)
        for i, count in enumerate(torch.bincount(iteration, minlength=n_iterations).tolist()):
            self.evaluations[i] += count
        finished, weight = self._decide(h, iteration, rows, position)
        done, go = finished.nonzero().squeeze(1), (~finished).nonzero().squeeze(1)
        logits = self.backbone.logits(h) if self.feedback.reads_logits and go.numel() else None
        if go.numel():
            continuing = rows[go]
            self.state[continuing] = self.feedback.update(
                self.backbone, self.state[continuing], h_raw[go], h[go], None if weight is None else weight[go], None if logits is None else logits[go]
            )
            self.iteration[continuing] += 1
        done_rows, done_iteration = rows[done], iteration[done]
        for i in range(1, n_iterations):  # a finished token's K/V stand in for it in later iterations
            later = done_iteration < i
            self.cache.inherit(i, done_rows[later], slot[done][later])
        done_logits = logits[done] if logits is not None else self.backbone.logits(h[done])
        return RowStep(finished=finished, logits=done_logits, depth=done_iteration + 1)

    def _decide(self, h: Tensor, iteration: Tensor, rows: Tensor, position: Tensor) -> tuple[Tensor, Tensor | None]:
        """Which rows' tokens are done after this pass (last iteration, or halted by the gate; the
        gate runs once per distinct iteration), and the feedback weight m*s of the others."""
        finished = iteration == self.recurrence.n_iterations - 1
        weight = torch.ones(h.shape[0], dtype=h.dtype, device=h.device) if self.gate.can_halt else None
        for i in iteration[~finished].unique().tolist():
            group = ((iteration == i) & ~finished).nonzero().squeeze(1)
            active = torch.ones(group.numel(), 1, dtype=torch.bool, device=h.device)
            decision = self.gate(h[group].unsqueeze(1), i, active, self.token[rows[group]].unsqueeze(1), position[group].unsqueeze(1))
            finished[group] = ~decision.active[:, 0]
            group_weight = feedback_weight(self.gate, decision, h.dtype)
            if group_weight is not None:
                weight[group] = group_weight[:, 0]
        return finished, weight
