"""Callbacks the CLI always installs; TensorBoard names are documented in the README."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_only


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


class FitSummary(Callback):
    """Prints what a run achieved when `fit` ends: validation perplexity (first and last check),
    mean depth, active fraction per iteration, inference FLOPs per token x vanilla next to the
    same model at full depth, and where the TensorBoard logs are."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.history.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history:
            return
        print(format_summary(self.history, pl_module, trainer.log_dir))


def format_summary(history: list[dict[str, float]], model: L.LightningModule, log_dir: str | None) -> str:
    first, last = history[0], history[-1]
    lines = [
        "",
        f"== {type(model).__name__} summary ==",
        f"val ppl: {first['val/ppl']:.2f} at the first check -> {last['val/ppl']:.2f} at the last ({len(history)} checks)",
    ]
    if getattr(model, "n_iterations", 1) > 1:
        fractions = [last[f"val/active_fraction/iter_{i}"] for i in range(model.n_iterations)]
        full = model.realised_flops([1.0] * model.n_iterations, model.config.max_seq_len)["x_vanilla"]
        halted = 1 - sum(fractions) / len(fractions)
        lines += [
            f"mean depth: {last['val/depth_mean']:.3f} of {model.n_iterations} iterations "
            f"({100 * halted:.1f}% of token-iterations halted)",
            "active fraction per iteration: " + ", ".join(f"{f:.3f}" for f in fractions),
            f"inference FLOPs per token: {last['val/flops_x_vanilla']:.2f}x vanilla "
            f"(the same model at fixed full depth, i.e. PonderLM: {full:.2f}x)",
        ]
    if log_dir:
        lines.append(f"TensorBoard logs: {log_dir}  (tensorboard --logdir {log_dir})")
    return "\n".join(lines)
