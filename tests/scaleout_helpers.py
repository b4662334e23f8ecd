"""Callbacks and helpers the scale-out tests load into `python -m ponder_lightning fit` subprocesses
(run with PYTHONPATH=tests): per-step losses as JSON, a hard kill at a given step, a NaN injection;
and the 2-rank worker of the batch-global gate/ponder-loss test (`global_selection_worker`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


class LossDump(Callback):
    """Appends {"step": global step before the update, "loss": mean of the ranks' losses,
    "depth": mean depth of the global batch's tokens, "aux": the ponder loss rank 0 computes on
    the step's trace} to a JSON-lines file (rank 0 writes). Averaging over ranks gives the loss of
    the global batch."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        loss = outputs["loss"].detach().clone().float()
        loss = trainer.strategy.reduce(loss, reduce_op="mean")
        record = {"step": trainer.global_step - 1, "loss": loss.item()}
        trace = outputs.get("trace")
        if trace is not None and trace.active:
            ran = torch.stack([trace.active[0].sum(), trace.depth().sum()]).float()
            ran = trainer.strategy.reduce(ran, reduce_op="sum")
            record["depth"] = (ran[1] / ran[0]).item()
            regularizer = getattr(pl_module, "regularizer", None)
            aux = (
                None
                if regularizer is None
                else regularizer(trace.scores, trace.active[:-1], record["step"], continuing=trace.active[1:])
            )
            if aux is not None:
                record["aux"] = aux.item()
        if trainer.is_global_zero:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")


class KillAtStep(Callback):
    """SIGKILLs every rank once `step` optimizer steps are done, before that step's checkpoint:
    what a preempted job looks like."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if trainer.global_step >= self.step:
            trainer.strategy.barrier("KillAtStep")
            os.kill(os.getpid(), signal.SIGKILL)


class SigtermAtStep(Callback):
    """Sends SIGTERM to this process (rank 0 only, as a scheduler that signals one process might)
    once `step` optimizer steps are done: what a preemption notice looks like."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            os.kill(os.getpid(), signal.SIGTERM)


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


def read_records(path: Path, key: str) -> dict[int, float]:
    """step -> LossDump's `key` ("depth", "aux"), last value per step."""
    return {r["step"]: r[key] for r in map(json.loads, path.read_text().splitlines()) if key in r}


def logged_steps(path: Path) -> list[int]:
    """The steps in the order they were logged (a resumed run repeats none but its first)."""
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def run_fit(*args: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """`python -m ponder_lightning fit ...` in a subprocess that can import this module."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [sys.executable, "-m", "ponder_lightning", "fit", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- the 2-rank test of BottomKPonderLoss and BottomKGate (no Lightning: forked ranks over gloo) ------
def global_selection_inputs() -> dict:
    """A global batch of 4 rows x 8 tokens with 3 decisions: gate-score inputs and a ponder-loss
    trace, built with many exact ties (also across the two ranks' rows) at every cut-off."""
    gen = torch.Generator().manual_seed(3)
    b, t, d = 4, 8, 16
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[3, -2:] = False  # padding is never an entry
    active = [valid]
    for _ in range(3):
        active.append(active[-1] & (torch.rand(b, t, generator=gen) > 0.3))
    # scores on a grid of eighths: ties at the bottom-k boundary, rows of rank 0 and rank 1 alike
    scores = [torch.randint(1, 8, (b, t), generator=gen) / 8.0 for _ in range(3)]
    # hidden states drawn from 8 vectors only: the gate's scores tie too, across ranks
    table = F.layer_norm(torch.randn(8, d, generator=gen), (d,))
    h = table[torch.randint(0, 8, (2, b, t), generator=gen)]
    return {"active": active, "scores": scores, "h": h, "d": d}


def global_selection_results(rank: int, world: int) -> dict:
    """What rank `rank` of `world` computes on its contiguous slice of the global batch: for both
    ponder-loss operands the returned loss, `describe`, and the gradient on its scores; and
    BottomKGate's decisions on its rows over two steps, with the learned thresholds."""
    from ponder_lightning.gates import BottomKGate, BottomKPonderLoss

    case = global_selection_inputs()
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    active = [a[rows] for a in case["active"]]
    out: dict = {}
    for operand in ("score", "log_score"):
        reg = BottomKPonderLoss(lam=0.3, k_max=0.4, start_step=0, ramp_steps=1, operand=operand)
        scores = [s[rows].clone().requires_grad_(True) for s in case["scores"]]
        loss = reg(scores, active[:-1], step=7, continuing=active[1:])
        loss.backward()
        out[operand] = {
            "loss": loss.item(),
            "describe": reg.describe(scores, active[:-1], step=7, continuing=active[1:]),
            "grads": [s.grad for s in scores],
        }
    torch.manual_seed(0)
    gate = BottomKGate(ratio=0.3, momentum=0.5)
    gate.bind(case["d"], 3)
    with torch.no_grad():
        for mlp in gate.mlps:
            mlp[2].weight.normal_(0.0, 1.0)
            mlp[2].bias.zero_()
    halted = []
    for h in case["h"]:
        now = active[0]
        for i in range(3):
            now = gate(h[rows], i, now, None, None).active
            halted.append(now)
    out["gate"] = {"active": halted, "thresholds": gate.thresholds.clone()}
    return out


def global_selection_worker(rank: int, world: int, out_dir: str) -> None:
    """torch.multiprocessing.start_processes target: rank 0 first saves the one-process
    reference, then every rank joins a gloo group and saves its own results."""
    torch.set_num_threads(1)
    if rank == 0:
        torch.save(global_selection_results(0, 1), os.path.join(out_dir, "single.pt"))
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world
    )
    try:
        torch.save(global_selection_results(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()
