"""Batch sampling as a pure function of (seed, global batch index, rank).

Global training sample ``j`` is block ``perm_e[j mod N]`` with ``e = j // N`` and ``perm_e`` a
permutation of the ``N`` blocks seeded by ``(seed, e)``. Global batch ``g`` is samples
``g*B .. g*B + B - 1`` and rank ``r`` of ``W`` takes the ``r``-th contiguous ``B/W`` of them. No
iterator state exists, so resuming at batch ``g`` only needs ``g``, and the union over ranks of a
global batch is the same for every world size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import numpy as np
from torch.utils.data import Sampler

from ponder_lightning.errors import UserError


@functools.lru_cache(maxsize=2)  # a batch touches at most two epochs when B <= N
def epoch_permutation(seed: int, epoch: int, num_blocks: int) -> np.ndarray:
    """The block order of one pass over the data (seeded PCG64, so fixed for a given NumPy version)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch]))).permutation(num_blocks)


def train_batch(
    seed: int, num_blocks: int, global_batch: int, batch_index: int, rank: int = 0, world_size: int = 1
) -> list[int]:
    """Block indices rank ``rank`` reads for global batch ``batch_index``."""
    per_rank = global_batch // world_size
    first = batch_index * global_batch + rank * per_rank
    samples = np.arange(first, first + per_rank, dtype=np.int64)
    epochs, positions = np.divmod(samples, num_blocks)
    out = np.empty_like(samples)
    for e in np.unique(epochs):
        mask = epochs == e
        out[mask] = epoch_permutation(seed, int(e), num_blocks)[positions[mask]]
    return out.tolist()


class TrainBatchSampler(Sampler[list[int]]):
    """Yields this rank's share of consecutive global batches, one "epoch" (N // B batches) per pass.

    ``start_batch`` is where a pass begins: an int, or a callable evaluated when the pass starts
    (the DataModule passes the trainer's micro-batch count, so resuming from a checkpoint and every
    new epoch continue exactly where an uninterrupted run would be). With an int, later passes
    continue after the last batch handed out.
    """

    def __init__(
        self,
        num_blocks: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_batch: int | Callable[[], int] = 0,
    ) -> None:
        super().__init__()
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        self.num_blocks, self.global_batch = num_blocks, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start_batch = start_batch
        self._next = 0 if callable(start_batch) else start_batch
        self._resume_at: int | None = None

    def __len__(self) -> int:
        return self.num_blocks // self.global_batch

    def __iter__(self) -> Iterator[list[int]]:
        if self._resume_at is not None:
            start, self._resume_at = self._resume_at, None
        else:
            start = self.start_batch() if callable(self.start_batch) else self._next
        return self._batches(start)

    def state_dict(self) -> dict[str, int]:
        """The next global batch to read (for Lightning's resumable-dataloader protocol). With a
        callable `start_batch` it is the trainer's count of consumed batches, which is exact even
        when a DataLoader has already fetched batches ahead; else the batch after the last handed out."""
        next_batch = self.start_batch() if callable(self.start_batch) else self._next
        # Plain ints: a checkpoint must load with torch.load(weights_only=True).
        return {
            "next_batch": int(next_batch),
            "global_batch": int(self.global_batch),
            "num_blocks": int(self.num_blocks),
            "seed": int(self.seed),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at the saved position. With a different global batch size the position is
        converted by samples seen, so no sample is skipped or repeated across the change. A
        different number of training blocks or seed would silently give another split or order
        (validation blocks trained on, trained blocks repeated), so they are errors."""
        saved_blocks, saved_seed = state.get("num_blocks", self.num_blocks), state.get("seed", self.seed)
        if int(saved_blocks) != self.num_blocks:
            raise UserError(
                f"the checkpoint was trained on {saved_blocks} training blocks but the data now gives "
                f"{self.num_blocks} (data.data_files, data.tokens, data.val_files, data.seq_len or data.val_fraction "
                "changed): resume with the run's data settings, or start a new run without --ckpt_path"
            )
        if int(saved_seed) != self.seed:
            raise UserError(
                f"the checkpoint was trained with data.seed={saved_seed} but data.seed={self.seed} now (another "
                "training order): resume with the same data.seed, or start a new run without --ckpt_path"
            )
        samples = int(state["next_batch"]) * int(state.get("global_batch", self.global_batch))
        self._resume_at = -(-samples // self.global_batch)

    def _batches(self, start: int) -> Iterator[list[int]]:
        for g in range(start, start + len(self)):
            self._next = g + 1
            yield train_batch(self.seed, self.num_blocks, self.global_batch, g, self.rank, self.world_size)


class EvalBatchSampler(Sampler[list[int]]):
    """The first ``num_batches`` global batches of blocks in order, each split contiguously by rank."""

    def __init__(self, num_batches: int, global_batch: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        self.num_batches, self.global_batch = num_batches, global_batch
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.global_batch // self.world_size
        for g in range(self.num_batches):
            first = g * self.global_batch + self.rank * per_rank
            yield list(range(first, first + per_rank))
