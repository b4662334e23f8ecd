"""Helpers shared by the benchmark scripts: machine description, timing, table and JSON output."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ponder_lightning.generate import Generation, generate
from ponder_lightning.nn.onednn import prepacked_weights

OUT_DIR = Path(__file__).resolve().parent / "out"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    host = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    return f"{torch.cuda.get_device_name()}, {host}" if torch.cuda.is_available() else host


def wait_for_gpu() -> None:
    """CUDA runs asynchronously: wait for queued work before reading a clock."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_once(fn: Callable[[], None]) -> float:
    wait_for_gpu()
    start = time.perf_counter()
    fn()
    wait_for_gpu()
    return time.perf_counter() - start


def alternate(contenders: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each contender, timed in alternation so that drifts in the
    machine's load hit every contender alike."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            samples[name].append(time_once(fn))
    return {name: sorted(v)[len(v) // 2] for name, v in samples.items()}


class Decoder:
    """Prefill, then greedy lock-step decoding: every row runs iteration i of its token before any
    row runs i+1 (`model.extend` one token per row per step). Records backbone evaluations and
    the seconds of each phase of every run."""

    def __init__(self, model, prompts: torch.Tensor, new_tokens: int) -> None:
        self.model, self.prompts, self.new_tokens = model, prompts, new_tokens
        self.prefill_counts: list[int] = []
        self.decode_counts: list[int] = []
        self.decode_passes = 0  # backbone calls of the last run's decoding
        self.decode_seconds: list[float] = []

    def prefill(self) -> None:
        self.cache = self.model.new_cache(self.prompts.shape[0], self.prompts.shape[1] + self.new_tokens)
        valid = torch.ones_like(self.prompts, dtype=torch.bool)
        hidden, _, counts = self.model.extend(self.prompts, valid, self.cache)
        self.prefill_counts = counts
        self.last = hidden[:, -1]

    @prepacked_weights()  # as generate does: the last hidden states' logits run on packed weights too
    def __call__(self) -> None:
        """Prefill, then decode `new_tokens - 1` steps (the first new token comes from the prefill),
        timing the decoding alone."""
        self.prefill()
        start = time.perf_counter()
        totals, passes = [0] * self.model.n_iterations, 0
        ones = torch.ones(self.prompts.shape[0], 1, dtype=torch.bool, device=self.prompts.device)
        for _ in range(self.new_tokens - 1):
            token = self.model.backbone.logits(self.last).argmax(-1, keepdim=True)
            hidden, _, counts = self.model.extend(token, ones, self.cache)
            totals = [t + c for t, c in zip(totals, counts, strict=True)]
            passes += sum(1 for c in counts if c)
            self.last = hidden[:, -1]
        wait_for_gpu()
        self.decode_seconds.append(time.perf_counter() - start)
        self.decode_counts, self.decode_passes = totals, passes

    def seconds(self) -> float:
        """Median decode seconds over the timed runs (the first, a warm-up, left out)."""
        return _median(self.decode_seconds[1:])


class Generate:
    """`ponder_lightning.generate` as users call it (greedy, row-wise decoding); keeps every run's
    result so that its own prefill and decode timings can be read back."""

    def __init__(self, model, prompts: torch.Tensor, new_tokens: int, compile_attention: bool = False) -> None:
        self.model, self.prompts, self.new_tokens = model, prompts.tolist(), new_tokens
        self.compile_attention = compile_attention
        self.runs: list[Generation] = []

    def __call__(self) -> None:
        self.runs.append(
            generate(self.model, self.prompts, max_new_tokens=self.new_tokens, compile_attention=self.compile_attention)
        )

    def seconds(self, phase: str) -> float:
        """Median over the timed runs (the first, a warm-up, left out) of `phase`_seconds."""
        return _median([run.stats[f"{phase}_seconds"] for run in self.runs[1:]])

    def counts(self, phase: str) -> list[int]:
        return self.runs[-1].evaluations[phase]

    def passes(self, phase: str) -> int:
        """Backbone calls of the last run's `phase`: one per iteration that ran for the prefill."""
        if phase == "decode":
            return int(self.runs[-1].stats["decode_passes"])
        return sum(1 for c in self.counts(phase) if c)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def write_results(name: str, rows: list[dict], columns: list[str]) -> Path:
    """Print a markdown table and write rows + machine to benchmarks/out/<name>.json."""
    header = "| " + " | ".join(columns) + " |"
    print(header)
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(_fmt(row[c]) for c in columns) + " |")
    OUT_DIR.mkdir(exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    print(f"\nmachine: {machine()}\nwrote {path}")
    return path


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
