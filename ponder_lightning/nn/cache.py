"""Per-iteration KV caches for incremental decoding, owned by the library.

One K and one V tensor hold every (layer, iteration) of a batch of sequences. Prefill fills them
together (prompts are left-padded to a common length, so slot s is the same step for every row);
row-wise decoding (`nn/rowwise.py`) then lets each row fill its own next slots. A token
that halts after iteration j has its iteration-j K/V copied into every later iteration's cache
(one slot per layer, cheap), so later tokens see exactly what the training-time KV alignment
shows them.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(self, n_iterations: int, n_layers: int, batch: int, n_heads: int, head_dim: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        # Layer first, so that one layer's (iteration, row) caches form one [N * B] axis to gather from.
        shape = (n_layers, n_iterations, batch, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.n_real = torch.zeros(batch, dtype=torch.long, device=device)  # real tokens per row so far
        self.length = 0  # slots used (same for every row)
        self.max_len = max_len

    def reserve(self, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Claim slots for new tokens [B, T_new]; returns their slot indices [T_new] and rotary
        positions [B, T_new] (counting only real tokens, so left padding changes nothing)."""
        t_new = valid.shape[1]
        if self.length + t_new > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {t_new} tokens exceed its {self.max_len} slots")
        slots = torch.arange(self.length, self.length + t_new, device=valid.device)
        positions = (self.n_real.unsqueeze(1) + valid.long().cumsum(1) - 1).clamp(min=0)
        self.key_valid[:, slots] = valid
        return slots, positions

    def commit(self, valid: Tensor) -> None:
        self.length += valid.shape[1]
        self.n_real += valid.sum(1)

    def inherit(self, iteration: int, rows: Tensor, slots: Tensor) -> None:
        """Halted tokens (rows[j], slots[j]) keep the K/V of the previous iteration in this one."""
        if rows.numel():
            self.k[:, iteration][:, rows, :, slots] = self.k[:, iteration - 1][:, rows, :, slots]
            self.v[:, iteration][:, rows, :, slots] = self.v[:, iteration - 1][:, rows, :, slots]


class CacheWriter:
    """KV hook for one backbone pass of packed queries: writes the new tokens' K/V into their slots
    of the cache and lets them attend over the whole cached prefix.

    `iteration` is the cache every row uses (an int), or one per row ([B'] tensor) when rows are
    at different iterations (row-wise decoding). `rows` [B'] are the batch rows that run, `slots`
    [B', A] the slot of each packed query (padding entries duplicate a real one of the same row,
    so their writes are identical).
    """

    def __init__(self, cache: KVCache, iteration: int | Tensor, rows: Tensor, slots: Tensor, total_len: int, all_rows: bool) -> None:
        self.cache, self.rows, self.slots = cache, rows, slots
        self.iteration = iteration if isinstance(iteration, int) else iteration.unsqueeze(1)
        self.total_len, self.all_rows = total_len, all_rows

    def __call__(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        cache_k, cache_v = self.cache.k[layer], self.cache.v[layer]  # [N, B, H, L, Dh]
        index = (self.iteration, self.rows.unsqueeze(1), slice(None), self.slots)
        cache_k[index] = k.transpose(1, 2)
        cache_v[index] = v.transpose(1, 2)
        if isinstance(self.iteration, int):
            cache_k, cache_v = cache_k[self.iteration, :, :, : self.total_len], cache_v[self.iteration, :, :, : self.total_len]
            if self.all_rows:  # a view, no copy
                return cache_k, cache_v
            return cache_k.index_select(0, self.rows), cache_v.index_select(0, self.rows)
        n_iterations, batch = cache_k.shape[:2]
        flat = self.iteration.squeeze(1) * batch + self.rows  # (iteration, row) -> one index
        return tuple(c.view(n_iterations * batch, *c.shape[2:])[:, :, : self.total_len].index_select(0, flat) for c in (cache_k, cache_v))
