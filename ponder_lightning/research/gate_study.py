"""The gate study: the library's controls of a halting gate (`evaluate.gate_controls`) and,
after them, other choices of the same number of tokens at each decision, on the same weights,
with the learned per-iteration profile and the learned scores as feedback (`RankedPruning`):

- the tokens the first pass was least sure of, and those it was surest of (the entropy of its
  prediction: rules a deployed gate could follow);
- a linear probe fitted to the pondering gain from the gate's own input (`probe_gain`: how
  predictable the right choice is from what a gate sees);
- two oracles that read the targets: the hardest tokens (NLL at full depth; the paper's "more
  passes for hard tokens" as a policy) and the tokens pondering helps most. The oracles bound
  what any choice of tokens could gain on these weights, and tell whether following difficulty
  would even pay.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ponder_lightning.evaluate import counted, gate_controls, scored_gate, summarise, token_entropy, token_nll
from ponder_lightning.gates import FirstPassOnly, Gate
from ponder_lightning.research.controls import RankedPruning, RecordingFullDepth


def gate_study(
    model, batches: Iterable[Any], context: int, reference=None, seeds: tuple[int, ...] = (0, 1)
) -> dict[str, Any]:
    """`evaluate.gate_controls` with the rankings of the module docstring after its rows."""
    batches = list(batches)
    study = gate_controls(model, batches, context, reference=reference, seeds=seeds)
    gate, profile = scored_gate(model), study["rows"][0]["active_fractions"]
    full_depth_gate = RecordingFullDepth(gate)
    full_nll, _ = token_nll(model, batches, full_depth_gate)
    first_nll, _ = token_nll(model, batches, FirstPassOnly(gate))
    first_entropy = token_entropy(model, batches, FirstPassOnly(gate))
    gain = first_nll - full_nll  # what the passes do for a token (> 0: pondering helps it)
    for label, kind, priority in [
        ("least sure after the first pass go on (entropy), learned profile", "entropy_least_sure", first_entropy),
        ("surest after the first pass go on (entropy), learned profile", "entropy_surest", -first_entropy),
        (
            "linear probe of the gain from the gate's input go on (cross-fitted), learned profile",
            "probe_gain",
            probe_gain(full_depth_gate.first_inputs, gain, batches),
        ),
        ("oracle: hardest go on (NLL at full depth), learned profile", "oracle_hardest", full_nll),
        ("oracle: most helped by pondering go on, learned profile", "oracle_gain", gain),
    ]:
        if priority is None:
            continue
        ranked = ranked_pruning(model, batches, gate, priority, profile)
        study["rows"].append({"control": label, "kind": kind} | summarise(model, *ranked, context))
    return study


def probe_gain(first_inputs: list[Tensor], gain: Tensor, batches: list[Any], ridge: float = 1e-3) -> Tensor | None:
    """Each counted token's pondering gain as predicted from what the first decision's gate sees
    (`first_inputs`, one [B, T, d] per batch) by a linear probe: ridge regression on standardised
    features, fitted on the other half of the blocks (cross-fitting, so no token's own target
    enters its prediction). Ranked by it, the tokens show how much of the oracle's choice a gate
    fitted to the gain could reach from its input. None with fewer than two batches."""
    if len(batches) < 2:
        return None
    masks = [counted(batch) for batch in batches]
    x = torch.cat([h[mask] for h, mask in zip(first_inputs, masks, strict=True)]).double()
    y = gain.double()
    second_half = torch.cat([torch.full((int(m.sum()),), i >= len(batches) // 2) for i, m in enumerate(masks)])
    predicted = torch.empty_like(y)
    for fit_on in (~second_half, second_half):
        mean, std = x[fit_on].mean(0), x[fit_on].std(0).clamp_min(1e-8)

        def design(rows: Tensor, mean: Tensor = mean, std: Tensor = std) -> Tensor:
            return torch.cat([(rows - mean) / std, torch.ones(len(rows), 1, dtype=rows.dtype)], dim=1)

        a = design(x[fit_on])
        penalty = ridge * len(a) * torch.eye(a.shape[1], dtype=a.dtype)
        weights = torch.linalg.solve(a.T @ a + penalty, a.T @ y[fit_on])
        predicted[~fit_on] = design(x[~fit_on]) @ weights
    return predicted


def ranked_cutoffs(priority: Tensor, active_fractions: list[float]) -> list[float]:
    """Cut-offs for `RankedPruning` so that, when the tokens with the highest `priority` go on,
    iteration i+1 runs for `active_fractions[i + 1]` of them (as close as a whole count allows)."""
    ordered = priority.flatten().double().sort(descending=True).values
    cutoffs = []
    for fraction in active_fractions[1:]:
        keep = round(fraction * ordered.numel())
        cutoffs.append(math.inf if keep == 0 else -math.inf if keep == ordered.numel() else float(ordered[keep - 1]))
    return cutoffs


def ranked_pruning(
    model, batches: list[Any], gate: Gate, priority: Tensor, active_fractions: list[float]
) -> tuple[Tensor, Tensor]:
    """Per-token NLL and depth when the tokens with the highest `priority` (flat, one value per
    counted target, as `token_nll` orders them) go on, following the learned `active_fractions`.
    Positions without a target (padding) never halt by this rule."""
    control = RankedPruning(gate, ranked_cutoffs(priority, active_fractions))

    def with_priority() -> Iterable[Any]:
        """Each batch, after setting its priority on the control (`token_nll` runs a batch
        before it asks for the next one)."""
        offset = 0
        for batch in batches:
            mask = counted(batch)
            n = int(mask.sum())
            control.priority = torch.full(mask.shape, math.inf, dtype=torch.float64)
            control.priority[mask] = priority[offset : offset + n].double()
            offset += n
            yield batch

    return token_nll(model, with_priority(), control)
