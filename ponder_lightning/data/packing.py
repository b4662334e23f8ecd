"""Split a token stream into train/validation documents and cut it into training blocks.

Pythia/Megatron-style packing: documents are concatenated with an EOS after each, and block ``i``
is ``stream[i*L : i*L + L + 1]``. Consecutive blocks overlap by one token so the last position of
every block still has a target, and no token is wasted on padding. The incomplete tail is dropped.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from ponder_lightning.data.shards import TokenStream


def num_val_docs(num_docs: int, val_fraction: float) -> int:
    """Documents held out for validation: ceil(fraction * docs), but always leaving one to train on."""
    if num_docs < 2 or val_fraction <= 0:
        return 0
    return min(num_docs - 1, math.ceil(num_docs * val_fraction - 1e-9))


def split_documents(
    stream: TokenStream, num_docs: int, val_fraction: float, eos_id: int
) -> tuple[TokenStream, TokenStream]:
    """(train, val): the last ``num_val_docs`` documents of the stream are validation.

    Splitting on document boundaries keeps the two sets disjoint; taking the tail makes the split
    deterministic and lets it be found by scanning only the validation tokens.
    """
    n_val = num_val_docs(num_docs, val_fraction)
    boundary = len(stream) if n_val == 0 else _after_nth_eos_from_end(stream, n_val + 1, eos_id)
    return stream.window(0, boundary), stream.window(boundary, len(stream))


def _after_nth_eos_from_end(stream: TokenStream, n: int, eos_id: int) -> int:
    seen = 0
    for lo, chunk in stream.chunks(reverse=True):
        hits = np.flatnonzero(chunk == eos_id)
        if seen + len(hits) >= n:
            return lo + int(hits[len(hits) - (n - seen)]) + 1
        seen += len(hits)
    return 0  # fewer documents than meta.json claims: everything is validation, train is reported empty


class PackedBlocks(Dataset[torch.Tensor]):
    """Map-style dataset of ``seq_len + 1``-token blocks (the model shifts inputs and targets)."""

    def __init__(self, stream: TokenStream, seq_len: int) -> None:
        self.stream = stream
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.stream) - 1) // self.seq_len)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range for {len(self)} blocks")
        start = index * self.seq_len
        return torch.from_numpy(self.stream.read(start, start + self.seq_len + 1).astype(np.int64))
