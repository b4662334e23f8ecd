"""Helpers shared by the benchmark scripts: machine description, timing, table and JSON output."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

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
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def time_once(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
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
