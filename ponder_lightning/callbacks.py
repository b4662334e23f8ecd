"""Callbacks the CLI always installs; TensorBoard names are documented in the README."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor


def _batch_rows(batch: Any) -> int:
    ids = batch["input_ids"] if isinstance(batch, dict) else batch
    return ids.shape[0]


def _batch_tokens(batch: Any) -> int:
    """Input tokens in a batch (the last column is only a target); padding excluded."""
    if isinstance(batch, dict) and "attention_mask" in batch:
        return int(batch["attention_mask"][:, :-1].sum())
    ids = batch["input_ids"] if isinstance(batch, dict) else batch
    return ids.shape[0] * (ids.shape[1] - 1)


class TokenThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor with tokens as items: logs `train/device/items_per_sec`
    (tokens/s per device), `train/device/flops_per_sec` and, on GPUs with a known peak, MFU.

    Args:
        window_size: batches averaged per reading (short, so that short CPU runs log it too).
    """

    def __init__(self, window_size: int = 5) -> None:
        super().__init__(batch_size_fn=_batch_rows, length_fn=_batch_tokens, window_size=window_size, separator="/")
