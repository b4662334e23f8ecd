"""Collectives the gates and the ponder loss share to act on the global batch across ranks."""

from __future__ import annotations

import torch
from torch import Tensor


def distributed_world_size() -> int:
    """Ranks of the default process group; 1 when torch.distributed is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def gather_rows(tensor: Tensor) -> tuple[Tensor, int]:
    """All ranks' `tensor` concatenated along dim 0 (the batch rows) in rank order, and the row
    at which this rank's own rows start. Rank r loads the r-th contiguous slice of the global
    batch (data/sampling.py), so this is the batch as one process would hold it. Ranks may hold
    different numbers of rows; the other dimensions must match. A collective: every rank calls it.
    """
    dist = torch.distributed
    world = dist.get_world_size()
    shape = torch.tensor(tensor.shape, dtype=torch.long, device=tensor.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    shapes = [tuple(s.tolist()) for s in shapes]
    if any(s[1:] != tuple(tensor.shape[1:]) for s in shapes):
        raise ValueError(f"ranks hold batches of incompatible shapes {shapes}: only the number of rows may differ")
    rows = [s[0] for s in shapes]
    padded = tensor.new_zeros((max(rows), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, rows, strict=True)]), sum(rows[: dist.get_rank()])
