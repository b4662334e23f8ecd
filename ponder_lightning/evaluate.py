"""Quality together with compute, and the controls that tell whether adaptive depth helps.

`evaluate`: validation loss/perplexity next to the depth actually run and the FLOPs it cost,
optionally swept over the halting threshold tau (a quality-vs-compute curve).

`gate_controls`: for a model whose gate halts tokens, the same weights and data evaluated
- at the learned depth,
- at full depth (no token halts; the dead-pass check: equal perplexity = the skipped passes or the
  passes kept at s ~ 0 contribute nothing),
- with random pruning that follows the learned per-iteration active fractions and keeps the
  learned scores (the fair iso-FLOPs control: only *which* tokens halt differs), one row per seed,
- and depth against token difficulty measured independently of the depth a token got: its NLL
  at full depth, at the first pass, and optionally under a reference (vanilla) model trained on
  the same data; and against the gain pondering brings a token (first-pass NLL minus full-depth
  NLL). Mean depth per decile of each and Spearman's rank correlation.

The research layer's `research.gate_study` adds other choices of the same number of tokens
(rules, a probe, oracles) to these rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ponder_lightning.errors import UserError
from ponder_lightning.gates import (
    AtThreshold,
    FirstPassOnly,
    FullDepth,
    Gate,
    MatchedRandomPruning,
    OracleDepth,
    ReadoutAtNeed,
)
from ponder_lightning.models.base import split_batch
from ponder_lightning.models.metrics import depth_by_decile, spearman
from ponder_lightning.models.recurrent import TokenRecurrentLM
from ponder_lightning.nn.loss import IGNORE_INDEX


@torch.no_grad()
def token_nll(model, batches: Iterable[Any], gate: Gate | None = None) -> tuple[Tensor, Tensor]:
    """NLL and depth of every counted (non-padding) target token, flat, in batch order; `gate`
    replaces the model's gate in force for these forwards."""
    model.eval()
    results = [model.token_nll(batch, gate) for batch in batches]
    return torch.cat([nll for nll, _ in results]), torch.cat([depth for _, depth in results])


@torch.no_grad()
def token_entropy(model, batches: Iterable[Any], gate: Gate | None = None) -> Tensor:
    """Entropy of the model's prediction for every counted target, flat as `token_nll` gives them:
    how unsure the model is, read without the target (what a deployed gate could act on)."""
    model.eval()
    entropies = []
    for batch in batches:
        inputs, _, valid = split_batch(batch)
        hidden, _ = model.hidden_states(inputs, valid, gate=gate)
        logprobs = model.token_logprobs(hidden[counted(batch)])
        entropies.append(-(logprobs.exp() * logprobs).sum(-1))
    return torch.cat(entropies)


@torch.no_grad()
def label_report(
    model, batches: Iterable[Any], labels: Iterable[Any], context: int, gate: Gate | None = None
) -> dict[str, Any]:
    """Accuracy (argmax = target), NLL and mean depth per label of the target tokens, for data
    whose tokens carry labels (`labels`: one per batch, [B, T] of the targets' labels, as
    `data.synthetic.target_labels` gives them; negative = unlabelled); how well depth separates
    the tokens that need more than one sequential step from those that need one
    (`auroc_depth_multi_step`: 0.5 = not at all, 1 = every multi-step token ran deeper; None when
    every such token ran the same depth); and the
    mean depth and FLOPs per token (x vanilla, at `context` tokens) over every scored token.
    `auroc_score_multi_step[i]`: the same AUROC for decision i's gate score, over the tokens
    still active at it (None without scores): does the gate *see* need, whether or not it halts by it.
    Measured without the model's depth: the labels come from the text."""
    from torchmetrics.functional.classification import binary_auroc

    from ponder_lightning.data.synthetic import STEPS, label_name

    model.eval()
    kept_labels, nlls, depths, correct, blocks = [], [], [], [], []
    decision_scores: list[list[Tensor]] = []
    n_blocks = 0  # validation blocks (rows of the batches) so far: each token's block id
    for batch, batch_labels in zip(batches, labels, strict=True):
        inputs, targets, valid = split_batch(batch)
        hidden, trace = model.hidden_states(inputs, valid, gate=gate)
        if isinstance(gate, ReadoutAtNeed):
            hidden = gate.pick(hidden)
        keep = targets != IGNORE_INDEX
        logprobs = model.token_logprobs(hidden[keep])
        nll = -logprobs.gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
        kept_labels.append(torch.as_tensor(batch_labels)[keep])
        nlls.append(nll)
        depths.append(trace.depth()[keep])
        # each decision's score where the token was still active at it (NaN: halted, or no score)
        decision_scores.append(
            [
                torch.full_like(nll, math.nan) if s is None else s.detach().float().where(a, math.nan)[keep]
                for s, a in zip(trace.scores, trace.active, strict=False)
            ]
        )
        correct.append(logprobs.argmax(-1) == targets[keep])
        rows = torch.arange(n_blocks, n_blocks + keep.shape[0], device=keep.device)
        blocks.append(rows.unsqueeze(1).expand(keep.shape)[keep])
        n_blocks += keep.shape[0]
    label, nll, depth, right = torch.cat(kept_labels), torch.cat(nlls), torch.cat(depths), torch.cat(correct)
    block = torch.cat(blocks)

    def per_block(mask: Tensor) -> list[list[int]]:
        """[correct, tokens] of one label in every block: what a paired bootstrap resamples."""
        hits = torch.bincount(block[mask], weights=right[mask].double(), minlength=n_blocks)
        counts = torch.bincount(block[mask], minlength=n_blocks)
        return [[int(h), int(c)] for h, c in zip(hits.tolist(), counts.tolist(), strict=True)]

    rows = {
        label_name(int(value)): {
            "tokens": int((label == value).sum()),
            "accuracy": float(right[label == value].double().mean()),
            "nll": float(nll[label == value].double().mean()),
            "depth_mean": float(depth[label == value].double().mean()),
            "per_block": per_block(label == value),
        }
        for value in sorted(label.unique().tolist())
        if value >= 0
    }
    multi, single = label > STEPS + 1, label == STEPS + 1
    both = multi | single
    separable = multi.any() and single.any() and len(depth[both].unique()) > 1  # else 0.5 by ties alone
    auroc = float(binary_auroc(depth[both].double(), multi[both].long())) if separable else None
    score_aurocs = []  # per decision, over the k >= 1 tokens active at it that have a score
    for i in range(len(decision_scores[0]) if decision_scores else 0):
        score = torch.cat([d[i] for d in decision_scores])
        at = both & ~score.isnan()
        known = at.any() and multi[at].any() and single[at].any()
        score_aurocs.append(float(binary_auroc(score[at].double(), multi[at].long())) if known else None)
    fractions = [float((depth > i).double().mean()) for i in range(model.n_iterations)]
    return {
        "labels": rows,
        "auroc_depth_multi_step": auroc,
        "auroc_score_multi_step": score_aurocs,
        "depth_mean": float(depth.double().mean()),
        "flops_x_vanilla": model.realised_flops(fractions, context)["x_vanilla"],
    }


def paired_bootstrap(
    a: list[list[list[int]]], b: list[list[list[int]]], resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Accuracy of `a` minus accuracy of `b` and its 95% interval, resampling validation blocks
    with replacement. `a[g][i]`, `b[g][i]`: [correct, tokens] of block i in group g (a seed);
    both were scored on the same blocks, so each resample keeps a block's pair together, and
    groups are resampled within themselves (a seed's blocks stand for that seed)."""
    generator = torch.Generator().manual_seed(seed)
    x = [torch.tensor(group, dtype=torch.float64) for group in a]
    y = [torch.tensor(group, dtype=torch.float64) for group in b]
    if any(gx.shape != gy.shape for gx, gy in zip(x, y, strict=True)):
        raise ValueError("a paired bootstrap needs both sides scored on the same blocks")

    def difference(picks: list[Tensor]) -> Tensor:
        sa = sum(gx[p].sum(-2) for gx, p in zip(x, picks, strict=True))
        sb = sum(gy[p].sum(-2) for gy, p in zip(y, picks, strict=True))
        return sa[..., 0] / sa[..., 1] - sb[..., 0] / sb[..., 1]

    point = float(difference([torch.arange(len(g)) for g in x]))
    picks = [torch.randint(len(g), (resamples, len(g)), generator=generator) for g in x]
    draws = difference(picks)
    draws = draws[~draws.isnan()]  # a resample without a token of this label
    low, high = torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return point, low, high


def label_study(model, batches: list[Any], context: int) -> dict[str, dict[str, Any]]:
    """`label_report` of the model as it runs and, for a model of several passes, on the same
    weights: every token at full depth (for a gate that halts), at the oracle's depth (each
    token halts after the passes its label needs, `OracleDepth`): the mechanism check, where a
    model whose passes do what the labels say matches full depth at fewer FLOPs; and every token
    at full depth read out at the pass it needs (`ReadoutAtNeed`, full depth's FLOPs), which
    tells a readout that is no prediction yet from K/V reuse when the oracle falls short."""
    from ponder_lightning.data.synthetic import passes_needed, target_labels

    labels = [torch.tensor(target_labels(batch)) for batch in batches]  # read from the text once
    reports = {"as_trained": label_report(model, batches, labels, context)}
    if model.n_iterations < 2 or not isinstance(model, TokenRecurrentLM):  # latent models have no token gate
        return reports
    if model.gate.can_halt:
        reports["full_depth"] = label_report(model, batches, labels, context, FullDepth(model.gate))
    needs = [passes_needed(batch_labels).clamp(max=model.n_iterations) for batch_labels in labels]
    for name, control in [("oracle_depth", OracleDepth(model.gate)), ("readout_at_need", ReadoutAtNeed(model.gate))]:

        def with_needs(control: OracleDepth | ReadoutAtNeed = control) -> Iterable[Any]:
            """Each batch, after setting the passes its tokens need on the control."""
            for batch, batch_needs in zip(batches, needs, strict=True):
                control.needs = batch_needs
                yield batch

        reports[name] = label_report(model, with_needs(), labels, context, control)
    return reports


def format_label_study(reports: dict[str, dict[str, Any]]) -> str:
    """One column group per way of running the model (accuracy / mean depth per label)."""
    names = list(reports)
    labels = list(reports[names[0]]["labels"])
    lines = [
        "| label | tokens | " + " | ".join(f"{n} accuracy | {n} NLL | {n} depth" for n in names) + " |",
        "|---|---|" + "---|---|---|" * len(names),
    ]
    for label in labels:
        cells = []
        for name in names:
            row = reports[name]["labels"][label]
            cells.append(f"{row['accuracy']:.3f} | {row['nll']:.4f} | {row['depth_mean']:.2f}")
        lines.append(f"| {label} | {reports[names[0]]['labels'][label]['tokens']} | " + " | ".join(cells) + " |")
    for name in names:
        auroc = reports[name]["auroc_depth_multi_step"]
        lines.append(
            f"{name}: mean depth {reports[name]['depth_mean']:.3f}, {reports[name]['flops_x_vanilla']:.3f}x vanilla "
            f"FLOPs, AUROC of depth (k >= 2 vs k = 1) {'n/a' if auroc is None else f'{auroc:.3f}'}"
            + "".join(
                f", of decision {i}'s score {value:.3f}"
                for i, value in enumerate(reports[name].get("auroc_score_multi_step", []))
                if value is not None
            )
        )
    return "\n".join(lines)


def counted(batch: Any) -> Tensor:
    """Bool [B, T]: the positions whose target counts (what `token_nll` returns, in this order)."""
    return split_batch(batch)[1] != IGNORE_INDEX


def summarise(model, nll: Tensor, depth: Tensor, context: int) -> dict[str, Any]:
    """Loss, ppl, mean depth, active fraction per iteration, FLOPs per token x vanilla and the
    depth-vs-NLL table (mean NLL of the tokens that ran each depth) of per-token results."""
    loss = float(nll.double().mean())
    fractions = [float((depth > i).double().mean()) for i in range(model.n_iterations)]
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "depth_mean": float(depth.double().mean()),
        "active_fractions": fractions,
        "flops_x_vanilla": model.realised_flops(fractions, context)["x_vanilla"],
        "depth_vs_nll": [
            (int(d), int((depth == d).sum()), float(nll[depth == d].double().mean())) for d in depth.unique().tolist()
        ],
    }


def halting_gate(model) -> Gate | None:
    """The model's gate if it halts tokens (then the gate study applies), else None."""
    return model.gate if model.gate is not None and model.gate.can_halt else None


def scored_gate(model) -> Gate:
    """The model's trained gate, if it has scores that a counterfactual can keep."""
    gate = halting_gate(model)
    if gate is None:
        raise UserError(
            f"{type(model).__name__} has no gate that halts tokens ({type(model.gate).__name__}): nothing to compare"
        )
    return gate


def evaluate(model, batches: Iterable[Any], context: int, taus: list[float] | None = None) -> list[dict[str, Any]]:
    """One row per tau (or a single row with the model's own gate): see `summarise`. A tau sweep
    re-thresholds the trained gate's scores (`AtThreshold`); the model itself is not changed."""
    batches = list(batches)
    if not taus:
        return [{"tau": getattr(model.gate, "tau", None)} | summarise(model, *token_nll(model, batches), context)]
    gate = scored_gate(model)
    if not hasattr(gate, "tau"):
        raise UserError(f"--tau needs a gate with a threshold; {type(gate).__name__} has none")
    return [
        {"tau": tau} | summarise(model, *token_nll(model, batches, AtThreshold(gate, tau)), context) for tau in taus
    ]


def difficulty_report(depth: Tensor, difficulties: dict[str, Tensor], bins: int = 10) -> dict[str, Any]:
    """For each difficulty measure: Spearman's rank correlation with depth and the mean depth per
    difficulty decile (positive / rising = harder tokens get more passes)."""
    return {
        name: {"spearman": spearman(depth.double(), value.double()), "deciles": depth_by_decile(value, depth, bins)}
        for name, value in difficulties.items()
    }


def gate_controls(
    model, batches: Iterable[Any], context: int, reference=None, seeds: tuple[int, ...] = (0, 1)
) -> dict[str, Any]:
    """The learned gate against its controls on the same weights and data (module docstring).
    `reference`: a one-pass model trained on the same data (same tokenizer) whose per-token NLL
    is a third difficulty measure."""
    gate = scored_gate(model)
    batches = list(batches)
    nll, depth = token_nll(model, batches)
    learned = {"control": "learned gate", "kind": "learned"} | summarise(model, nll, depth, context)
    full_nll, full_depth = token_nll(model, batches, FullDepth(gate))
    full = {"control": "full depth (no halting)", "kind": "full_depth"}
    rows = [learned, full | summarise(model, full_nll, full_depth, context)]
    for seed in seeds:
        control = MatchedRandomPruning(gate, learned["active_fractions"], seed=seed)
        rows.append(
            {"control": f"random pruning, learned profile (seed {seed})", "kind": "random_pruning"}
            | summarise(model, *token_nll(model, batches, control), context)
        )
    first_nll, _ = token_nll(model, batches, FirstPassOnly(gate))
    first_entropy = token_entropy(model, batches, FirstPassOnly(gate))
    # Not a difficulty but what the passes do for a token, also measured at full depth on the
    # same weights: NLL after one pass minus NLL after all of them (> 0: pondering helps it).
    gain = first_nll - full_nll
    difficulties = {"nll_full_depth": full_nll, "nll_first_pass": first_nll, "entropy_first_pass": first_entropy}
    if reference is not None:
        if reference.config.vocab_size != model.config.vocab_size:
            raise UserError(
                f"the reference model's vocabulary ({reference.config.vocab_size}) differs from the "
                f"model's ({model.config.vocab_size}): train the reference with the same tokenizer"
            )
        difficulties["nll_reference"] = token_nll(reference, batches)[0]
    difficulties["pondering_gain"] = gain
    return {"rows": rows, "difficulty": difficulty_report(depth, difficulties), "tokens": int(depth.numel())}


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| tau | val loss | ppl | mean depth | active fraction per iteration | FLOPs x vanilla |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        tau = "-" if r["tau"] is None else f"{r['tau']:g}"
        fractions = ", ".join(f"{f:.3f}" for f in r["active_fractions"])
        lines.append(
            f"| {tau} | {r['loss']:.4f} | {r['ppl']:.3f} | "
            f"{r['depth_mean']:.3f} | {fractions} | {r['flops_x_vanilla']:.3f} |"
        )
    return "\n".join(lines)


def format_gate_study(study: dict[str, Any]) -> str:
    lines = [
        "| same weights, same data | ppl | mean depth | active fraction per iteration | FLOPs x vanilla |",
        "|---|---|---|---|---|",
    ]
    for r in study["rows"]:
        fractions = ", ".join(f"{f:.3f}" for f in r["active_fractions"])
        lines.append(
            f"| {r['control']} | {r['ppl']:.3f} | {r['depth_mean']:.3f} | {fractions} | {r['flops_x_vanilla']:.3f} |"
        )
    lines += [
        "",
        *(
            ["(the oracle rows read the targets: bounds on what a choice of tokens could gain, not gates)", ""]
            if any(r["kind"].startswith("oracle") for r in study["rows"])
            else []
        ),
        f"mean depth per difficulty decile (easiest first; {study['tokens']} tokens):",
        "",
        "| measure (difficulty, or pondering_gain) | Spearman with depth | "
        + " | ".join(f"d{i + 1}" for i in range(10))
        + " |",
        "|---|---|" + "---|" * 10,
    ]
    for name, report in study["difficulty"].items():
        cells = " | ".join(f"{row['depth']:.2f}" for row in report["deciles"])
        lines.append(f"| {name} | {report['spearman']:+.3f} | {cells} |")
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


def write_depth_figure(row: dict[str, Any], out_dir: str | Path, deciles: list[dict[str, float]] | None = None) -> Path:
    """The depth figure of one evaluation row (tokens per depth and their mean NLL) and, when
    given, mean depth per decile of an independent difficulty measure."""
    from ponder_lightning.callbacks import depth_figure

    path = Path(out_dir) / "depth_vs_nll.png"
    figure = depth_figure(row["depth_vs_nll"], deciles)
    figure.savefig(path, dpi=120)
    return path
