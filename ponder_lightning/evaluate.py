"""Quality together with compute: validation loss/perplexity next to the depth actually run and
the FLOPs it cost, optionally swept over the halting threshold tau (a quality-vs-compute curve).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import torch

from ponder_lightning.errors import UserError


@torch.no_grad()
def evaluate(model, batches: Iterable[Any], context: int, taus: list[float] | None = None) -> list[dict[str, Any]]:
    """One row per tau (or a single row with the model's own gate): loss, ppl, mean depth,
    active fraction per iteration, FLOPs per token x vanilla and the depth-vs-NLL table."""
    model.eval()
    batches = list(batches)
    if taus and not hasattr(model.gate, "tau"):
        raise UserError(f"--tau needs a gate with a threshold; {type(model.gate).__name__} has none")
    original = getattr(model.gate, "tau", None)
    rows = []
    try:
        for tau in taus or [original]:
            if tau is not None:
                model.gate.tau = tau
            for i, batch in enumerate(batches):
                model.validation_step(batch, i)
            result = model.eval_metric.compute()
            fractions = result["active_fractions"].reshape(-1).tolist()
            rows.append({
                "tau": tau,
                "loss": float(result["loss"]),
                "ppl": math.exp(float(result["loss"])),
                "depth_mean": float(result["depth_mean"]),
                "active_fractions": fractions,
                "flops_x_vanilla": model.realised_flops(fractions, context)["x_vanilla"],
                "depth_vs_nll": model.eval_metric.table(),
            })
            model.eval_metric.reset()
    finally:
        if original is not None:
            model.gate.tau = original
    return rows


@torch.no_grad()
def iso_flops_study(model, batches: Iterable[Any], context: int) -> list[dict[str, Any]]:
    """The model's learned gate vs random pruning (`FixedRatioGate`, uniform and geometric
    schedules) matched to the learned gate's mean depth, on the same weights and data."""
    from ponder_lightning.gates import FixedRatioGate

    batches = list(batches)
    learned_gate = model.gate
    learned = evaluate(model, batches, context)[0] | {"gate": type(learned_gate).__name__}
    rows = [learned]
    try:
        for schedule in ("uniform", "geometric"):
            fixed = FixedRatioGate(target_depth=learned["depth_mean"], schedule=schedule)
            try:
                fixed.bind(model.config.d_model, model.n_iterations - 1)
            except ValueError as err:  # e.g. a uniform schedule cannot go below (N+1)/2
                rows.append({"gate": f"FixedRatioGate({schedule})", "error": str(err)})
                continue
            model.gate = fixed
            rows.append(evaluate(model, batches, context)[0] | {"gate": f"FixedRatioGate({schedule})"})
    finally:
        model.gate = learned_gate
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = ["| tau | val loss | ppl | mean depth | active fraction per iteration | FLOPs x vanilla |", "|---|---|---|---|---|---|"]
    for r in rows:
        tau = "-" if r["tau"] is None else f"{r['tau']:g}"
        fractions = ", ".join(f"{f:.3f}" for f in r["active_fractions"])
        lines.append(f"| {tau} | {r['loss']:.4f} | {r['ppl']:.3f} | {r['depth_mean']:.3f} | {fractions} | {r['flops_x_vanilla']:.3f} |")
    return "\n".join(lines)


def write_curve(rows: list[dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    """JSON of every row and a PNG of perplexity against FLOPs per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "evaluation.json", out / "quality_vs_compute.png"
    json_path.write_text(json.dumps(rows, indent=2))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["flops_x_vanilla"] for r in rows], [r["ppl"] for r in rows], "o-")
    for r in rows:
        if r["tau"] is not None:
            ax.annotate(f"tau={r['tau']:g}", (r["flops_x_vanilla"], r["ppl"]), fontsize=8)
    ax.set_xlabel("inference FLOPs per token (x vanilla)")
    ax.set_ylabel("validation perplexity")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path


def format_iso_flops(rows: list[dict[str, Any]]) -> str:
    lines = ["| gate | ppl | mean depth | FLOPs x vanilla |", "|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['gate']} | n/a: {r['error']} | | |")
        else:
            lines.append(f"| {r['gate']} | {r['ppl']:.3f} | {r['depth_mean']:.3f} | {r['flops_x_vanilla']:.3f} |")
    return "\n".join(lines)


def write_depth_vs_nll(row: dict[str, Any], out_dir: str | Path) -> Path:
    """The depth-vs-NLL figure (tokens per depth, mean NLL per depth) of one evaluation row."""
    from ponder_lightning.callbacks import depth_vs_nll_figure

    path = Path(out_dir) / "depth_vs_nll.png"
    figure = depth_vs_nll_figure(row["depth_vs_nll"])
    figure.savefig(path, dpi=120)
    return path
