"""Callbacks and helpers the scale-out tests load into `python -m ponder_lightning fit` subprocesses
(run with PYTHONPATH=tests): per-step losses as JSON, a hard kill at a given step, a NaN injection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


class LossDump(Callback):
    """Appends {"step": global step before the update, "loss": mean of the ranks' losses} to a
    JSON-lines file (rank 0 writes). Averaging over ranks gives the loss of the global batch."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"].detach().clone().float()
        loss = trainer.strategy.reduce(loss, reduce_op="mean")
        if trainer.is_global_zero:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": trainer.global_step - 1, "loss": loss.item()}) + "\n")


class KillAtStep(Callback):
    """SIGKILLs every rank once `step` optimizer steps are done, before that step's checkpoint:
    what a preempted job looks like."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            trainer.strategy.barrier("KillAtStep")
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonAtStep(Callback):
    """Fills one weight with NaN at the start of optimizer step `step` (the loss becomes NaN)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.backbone.final_layer_norm.weight.fill_(float("nan"))


def read_losses(path: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (re-run after a resume) keeps its last value."""
    out: dict[int, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            out[record["step"]] = record["loss"]
    return out


def logged_steps(path: Path) -> list[int]:
    """The steps in the order they were logged (a resumed run repeats none but its first)."""
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def run_fit(*args: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """`python -m ponder_lightning fit ...` in a subprocess that can import this module."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [sys.executable, "-m", "ponder_lightning", "fit", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )
