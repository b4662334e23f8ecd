"""The decoding KV cache every model uses: it owns the slots, the attention masks and the capacity.

One K and one V tensor hold every (layer, iteration) of a batch of sequences. Token-recurrent
models keep one cache per iteration: a token takes one slot, the same in each iteration's cache,
and a token that halts after iteration j has its iteration-j K/V copied into every later
iteration's cache (`inherit`, one slot per layer, cheap), so later tokens see exactly what the
training-time KV alignment shows them. Latent-slot models (PonderLM-2/3) keep one iteration and
take a slot per slot pass, each key with its attention bias (PonderLM-3's log w).

Prefill (`reserve`) gives every row the same new slots (prompts are left-padded to a common
length, so slot s is the same step for every row); row-wise decoding (`nn/rowwise.py`) then
claims each row's next slot on its own (`claim`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ponder_lightning.nn.backbone import Backbone, ScatteredKV


class KVCache:
    """K/V [layer, iteration, row, head, slot, head_dim] (layer first, so that one layer's
    (iteration, row) caches form one axis to gather from), the valid keys and the bias of each
    slot, and per row the slots used and the real tokens seen (the next token's rotary position),
    in the backbone's dtype and device. `key_bias`: keep an additive attention bias per key.

    `compile_attention`: one-token queries of rows whose caches are not one slice (rows at different
    iterations, or some rows only) attend to them where they lie, through a compiled attention
    (`nn.backbone.scattered_attention`), instead of copying them into one tensor for SDPA; it
    compiles once per process (seconds), so it is for long or repeated generation."""

    def __init__(self, backbone: Backbone, n_iterations: int, batch: int, max_len: int, key_bias: bool = False) -> None:
        cfg, weight = backbone.config, backbone.embed_in.weight
        dtype, device = weight.dtype, weight.device
        shape = (cfg.n_layer, n_iterations, batch, cfg.n_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.key_bias = torch.zeros(batch, max_len, dtype=dtype, device=device) if key_bias else None
        self.fill = torch.zeros(batch, dtype=torch.long, device=device)  # slots used per row
        self.n_real = torch.zeros(batch, dtype=torch.long, device=device)  # real tokens per row so far
        self.max_len = max_len
        self.compile_attention = False

    @property
    def batch(self) -> int:
        return self.key_valid.shape[0]

    def check_room(self, rows: Tensor, slots: int) -> None:
        """Raise unless each of `rows` has `slots` more free slots."""
        used = int(self.fill[rows].max()) if rows.numel() else 0
        if used + slots > self.max_len:
            raise ValueError(f"KV cache full: {used} + {slots} slots exceed its {self.max_len} slots")

    def reserve(self, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Claim the same new slots in every row for new tokens [B, T_new] (prefill); returns their
        slot indices [T_new] and rotary positions [B, T_new] (counting only real tokens, so left
        padding changes nothing)."""
        start = int(self.fill[0])
        if not bool((self.fill == start).all()):
            raise ValueError(
                "KV cache: a prefill needs every row at the same slot; its rows have moved on one by one "
                "(row-wise decoding)"
            )
        t_new = valid.shape[1]
        self.check_room(torch.arange(self.batch, device=valid.device), t_new)
        slots = torch.arange(start, start + t_new, device=valid.device)
        positions = (self.n_real.unsqueeze(1) + valid.long().cumsum(1) - 1).clamp(min=0)
        self.key_valid[:, slots] = valid
        self.fill += t_new
        self.n_real += valid.sum(1)
        return slots, positions

    def claim(self, rows: Tensor) -> Tensor:
        """One new slot for each of `rows` (row-wise decoding): their indices [n], marked valid."""
        self.check_room(rows, 1)
        slots = self.fill[rows]
        self.key_valid[rows, slots] = True
        self.fill[rows] += 1
        return slots

    def attention_mask(self, rows: Tensor, query_slots: Tensor, total_len: int) -> Tensor:
        """Mask [n, 1, A, total_len] for queries in slots `query_slots` [n, A] of `rows` [n]: each
        sees the valid keys up to its own slot; bool, or additive with the key bias if kept."""
        keys = torch.arange(total_len, device=rows.device) <= query_slots.unsqueeze(-1)
        keys &= self.key_valid[rows, None, :total_len]
        if self.key_bias is None:
            return keys.unsqueeze(1)
        return torch.where(keys, self.key_bias[rows, None, :total_len], float("-inf")).unsqueeze(1)

    def inherit(self, iteration: int, rows: Tensor, slots: Tensor) -> None:
        """Halted tokens (rows[j], slots[j]) keep the K/V of the previous iteration in this one."""
        if rows.numel():
            self.k[:, iteration][:, rows, :, slots] = self.k[:, iteration - 1][:, rows, :, slots]
            self.v[:, iteration][:, rows, :, slots] = self.v[:, iteration - 1][:, rows, :, slots]


class CacheWriter:
    """KV hook for one backbone pass of gathered queries: writes the new tokens' K/V into their
    slots of the cache and lets them attend over the whole cached prefix.

    `iteration` is the cache every row uses (an int), or one per row ([B'] tensor) when rows are
    at different iterations (row-wise decoding). `rows` [B'] are the batch rows that run, `slots`
    [B', A] the slot of each gathered query (padding entries duplicate a real one of the same row,
    so their writes are identical).
    """

    def __init__(self, cache: KVCache, iteration: int | Tensor, rows: Tensor, slots: Tensor, total_len: int) -> None:
        self.cache, self.rows, self.slots = cache, rows, slots
        self.iteration = iteration if isinstance(iteration, int) else iteration.unsqueeze(1)
        self.total_len = total_len
        #: one iteration and every row: the keys are one slice of the cache (a view, no copy)
        self.one_slice = isinstance(iteration, int) and rows.numel() == cache.batch
        # (iteration, row) -> index into the flat cache; a slice needs none
        self.flat = None if self.one_slice else iteration * cache.batch + rows

    def __call__(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor] | ScatteredKV:
        cache_k, cache_v = self.cache.k[layer], self.cache.v[layer]  # [N, B, H, L, Dh]
        index = (self.iteration, self.rows.unsqueeze(1), slice(None), self.slots)
        cache_k[index] = k.transpose(1, 2)
        cache_v[index] = v.transpose(1, 2)
        if self.one_slice:
            return cache_k[self.iteration, :, :, : self.total_len], cache_v[self.iteration, :, :, : self.total_len]
        flat_k, flat_v = (c.flatten(0, 1) for c in (cache_k, cache_v))
        if self.cache.compile_attention and self.slots.shape[1] == 1:
            return ScatteredKV(flat_k, flat_v, self.flat)
        return tuple(c[:, :, : self.total_len].index_select(0, self.flat) for c in (flat_k, flat_v))
