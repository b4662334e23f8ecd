"""Where a model ponders: per token, the passes it ran, the gate's score at each decision, what
each pass would have predicted (a logit lens over the passes) and the target's NLL after each,
as data (`pass_report`), a self-contained HTML page (`render_html`), terminal colours
(`render_ansi`) and a figure for TensorBoard (`depth_figure_of_tokens`).

The unit of pondering is the model's: a pass of the token recurrence (PonderLM, LoopTransformer,
AdaPonderLM; vanilla has one), or a latent slot of PonderLM-2/3, whose router weight w_k stands
where a gate's score does. What a pass "would have predicted" is the LM head on that pass's
readout (after the final norm), so the last pass a token ran is exactly the model's prediction.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ponder_lightning.gates import FullDepth, RecordingReadouts
from ponder_lightning.models.base import CausalLMModule
from ponder_lightning.models.ponder2 import PonderLM2
from ponder_lightning.models.recurrent import TokenRecurrentLM


@dataclass
class PassReport:
    """One sequence, token by token (input position t predicts `targets[t]`).

    `readout_logprobs[t, p]`: log-probabilities [V] of pass (or slot) p's readout of token t, for p < depth[t];
    `log_probs[t]` the model's own prediction (its last pass's, PonderLM-3's weighted readout) and
    `nll_as_run[t]` its target's NLL;
    `scores[t][i]`: the gate's score at decision i (router weight w_{i+1} for PonderLM-3), None
    where the token did not reach it or the model has no scores; `nll[t][p]`: the target's NLL
    after pass p; `nll_full_depth[t]`: with no token halting (same weights), None when the model
    cannot halt a token."""

    unit: str
    tokens: list[int]
    targets: list[int | None]
    depth: list[int]
    scores: list[list[float | None]]
    log_probs: Tensor
    readout_logprobs: Tensor
    nll: list[list[float | None]]
    nll_as_run: list[float | None]
    nll_full_depth: list[float | None]
    n_passes: int
    labels: list[int] | None = None

    def top(self, t: int, p: int, k: int = 5) -> list[tuple[int, float]]:
        """Pass p's k most probable next tokens for position t, with their probabilities."""
        probs = self.readout_logprobs[t, p].float().exp()
        values, ids = probs.topk(min(k, probs.numel()))
        return list(zip(ids.tolist(), values.tolist(), strict=True))


def _target_nll(log_probs: Tensor, targets: list[int | None]) -> Tensor:
    """NLL [T, P] of each position's target under log-probabilities [T, P, V] (0 where there is none)."""
    ids = torch.tensor([0 if y is None else y for y in targets], device=log_probs.device)
    return -log_probs.gather(-1, ids[:, None, None].expand(-1, log_probs.shape[1], 1)).squeeze(-1)


@torch.no_grad()
def pass_report(
    model: CausalLMModule, ids: Tensor | list[int], targets: list[int | None] | None = None, labels: Any = None
) -> PassReport:
    """Run `ids` [T] (one sequence) through the model's training forward and read every pass.
    `targets[t]`: the token that follows position t (default: the next id, None for the last)."""
    model.eval()
    ids = torch.as_tensor(ids, dtype=torch.long).view(1, -1).to(model.device)
    t = ids.shape[1]
    if targets is None:
        targets = [*ids[0, 1:].tolist(), None]
    full = None
    if isinstance(model, PonderLM2):
        out, passes, trace = model.latent.slot_outputs(ids, None, model.jacobi_passes())
        unit = "latent slot"
    elif isinstance(model, TokenRecurrentLM):
        recorder = RecordingReadouts(model.effective_gate())
        out, trace = model.hidden_states(ids, gate=recorder)
        passes, unit = recorder.passes(out), "pass"
        if model.effective_gate().can_halt:
            hidden, _ = model.hidden_states(ids, gate=FullDepth(model.effective_gate()))
            full = model.token_logprobs(hidden)[0]
    else:
        raise TypeError(f"pass_report does not know how {type(model).__name__} ponders")
    depth = trace.depth()[0].tolist()
    log_probs = model.token_logprobs(out)[0]
    readout_logprobs = model.token_logprobs(passes)[0]  # [T, P, V]
    n_passes = readout_logprobs.shape[1]
    nll = _target_nll(readout_logprobs, targets)  # [T, P]
    nll_own = _target_nll(log_probs.unsqueeze(1), targets)[:, 0]
    nll_full = None if full is None else _target_nll(full.unsqueeze(1), targets)[:, 0]
    report_scores = [
        [
            None if s is None or not bool(trace.active[i][0, pos]) else float(s[0, pos])
            for i, s in enumerate(trace.scores)
        ]
        for pos in range(t)
    ]
    return PassReport(
        unit=unit,
        tokens=ids[0].tolist(),
        targets=list(targets),
        depth=depth,
        scores=report_scores,
        log_probs=log_probs,
        readout_logprobs=readout_logprobs,
        nll=[
            [float(nll[pos, p]) if p < depth[pos] and targets[pos] is not None else None for p in range(n_passes)]
            for pos in range(t)
        ],
        nll_as_run=[None if targets[pos] is None else float(nll_own[pos]) for pos in range(t)],
        nll_full_depth=[None if nll_full is None or targets[pos] is None else float(nll_full[pos]) for pos in range(t)],
        n_passes=n_passes,
        labels=None if labels is None else [int(x) for x in labels],
    )


def token_decoder(tokenizer: Any) -> Callable[[int], str]:
    """One token's text; ids the tokenizer has no text for (EOS, the padded vocabulary) as <id>."""

    def decode(token: int) -> str:
        if token == getattr(tokenizer, "eos_id", None) or token >= tokenizer.vocab_size:
            return f"<{token}>"
        try:
            return tokenizer.decode([token])
        except ValueError:
            return f"<{token}>"

    return decode


#: Background colours per depth (1 = lightest), from ColorBrewer's sequential Blues.
PALETTE = ["#eff3ff", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b"]
#: xterm-256 background codes per depth, light to dark.
ANSI_PALETTE = [255, 153, 117, 75, 33, 27, 19, 17]


def depth_colour(depth: int, n_passes: int, palette: list[Any] = PALETTE) -> Any:
    """The colour of `depth` passes out of `n_passes`: evenly spread over the palette."""
    if n_passes <= 1:
        return palette[0]
    return palette[round((min(max(depth, 1), n_passes) - 1) * (len(palette) - 1) / (n_passes - 1))]


def summary(model: CausalLMModule, reports: list[PassReport]) -> dict[str, Any]:
    """Mean depth, FLOPs per token x vanilla at that depth, and mean NLL as run and at full depth,
    over every position with a target: what `evaluate.summarise` gives for the same tokens
    (tests/test_depth_map.py; not called from here, since `evaluate` reaches `callbacks`, which
    draws this map)."""
    scored = [(r, i) for r in reports for i, y in enumerate(r.targets) if y is not None]
    depths = [r.depth[i] for r, i in scored]
    nlls = [r.nll_as_run[i] for r, i in scored]
    full = [r.nll_full_depth[i] for r, i in scored]
    fractions = [sum(d > i for d in depths) / len(depths) for i in range(model.n_iterations)]
    context = max(len(r.tokens) for r in reports)
    return {
        "tokens": len(scored),
        "depth_mean": sum(depths) / len(depths),
        "flops_x_vanilla": model.realised_flops(fractions, context)["x_vanilla"],
        "nll": sum(nlls) / len(nlls),
        "nll_full_depth": None if None in full else sum(full) / len(full),
        "passes": reports[0].n_passes,
        "unit": reports[0].unit,
    }


def _token_data(report: PassReport, decode: Any, top_k: int) -> list[dict[str, Any]]:
    from ponder_lightning.data.synthetic import label_name

    rows = []
    for t, token in enumerate(report.tokens):
        rows.append(
            {
                "text": decode(token),
                "depth": report.depth[t],
                "target": None if report.targets[t] is None else decode(report.targets[t]),
                "scores": report.scores[t],
                "nll": report.nll[t],
                "nll_full_depth": report.nll_full_depth[t],
                "label": None if report.labels is None else label_name(report.labels[t]),
                "top": [
                    [[decode(i), p] for i, p in report.top(t, p, top_k)] if p < report.depth[t] else []
                    for p in range(report.n_passes)
                ],
            }
        )
    return rows


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
.block {{ font-family: monospace; font-size: 120%; white-space: pre-wrap; line-height: 1.9; border: 1px solid #ccc;
  padding: .6em; margin: .6em 0; }}
.tok {{ cursor: pointer; border-radius: 2px; padding: 1px 0; }}
.tok.selected {{ outline: 2px solid #d62728; }}
.legend span {{ display: inline-block; padding: 2px 8px; margin-right: 4px; font-family: monospace; }}
#detail {{ border: 1px solid #ccc; padding: .6em; min-height: 4em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 2px 6px; font-size: 90%; }}
</style></head>
<body>
<h1>{title}</h1>
<p id="summary"></p>
<p class="legend" id="legend"></p>
<div id="blocks"></div>
<h2>Token</h2>
<div id="detail">Click a token: its gate scores, each pass's top predictions and the target's NLL after each.</div>
{extra}
<script>
window.pageErrors = [];
window.addEventListener("error", function (e) {{
  window.pageErrors.push(String(e.message));
  document.body.dataset.errors = window.pageErrors.length;
}});
const DATA = {data};
function fmt(x, d) {{ return x === null || x === undefined ? "-" : Number(x).toFixed(d); }}
function show(token) {{
  const rows = [];
  for (let p = 0; p < DATA.passes; p++) {{
    const top = token.top[p].map(function (t) {{
      return JSON.stringify(t[0]) + " " + fmt(t[1], 3);
    }}).join(", ");
    rows.push("<tr><td>" + (p + 1) + "</td><td>" + (p > 0 ? fmt(token.scores[p - 1], 4) : "") + "</td><td>"
      + fmt(token.nll[p], 3) + "</td><td>" + (top || "(not run)") + "</td></tr>");
  }}
  const detail = document.getElementById("detail");
  detail.innerHTML = "<b>" + JSON.stringify(token.text) + "</b> &rarr; target " + JSON.stringify(token.target)
    + (token.label ? " (label " + token.label + ")" : "") + ": ran " + token.depth + " of " + DATA.passes + " "
    + DATA.units + "; NLL at full depth " + fmt(token.nll_full_depth, 3)
    + "<table><tr><th>" + DATA.unit + "</th><th>score before it</th><th>target NLL after it</th>"
    + "<th>top predictions</th></tr>"
    + rows.join("") + "</table>";
}}
const legend = document.getElementById("legend");
for (let d = 1; d <= DATA.passes; d++) {{
  const s = document.createElement("span");
  s.style.background = DATA.colours[d];
  s.style.color = d > DATA.passes / 2 ? "#fff" : "#000";
  s.textContent = d + " " + (d > 1 ? DATA.units : DATA.unit);
  legend.appendChild(s);
}}
const S = DATA.summary;
document.getElementById("summary").textContent = S.tokens + " tokens: mean depth " + fmt(S.depth_mean, 3) + " of "
  + S.passes + " " + DATA.units + ", " + fmt(S.flops_x_vanilla, 3) + "x vanilla FLOPs per token; mean NLL "
  + fmt(S.nll, 4) + " as run, "
  + (S.nll_full_depth === null ? "(nothing halts: full depth is as run)" : fmt(S.nll_full_depth, 4) + " at full depth");
const blocks = document.getElementById("blocks");
let count = 0;
DATA.blocks.forEach(function (block) {{
  const div = document.createElement("div");
  div.className = "block";
  block.forEach(function (token) {{
    const span = document.createElement("span");
    span.className = "tok";
    span.textContent = token.text;
    span.dataset.depth = token.depth;
    span.style.background = DATA.colours[token.depth];
    span.style.color = token.depth > DATA.passes / 2 ? "#fff" : "#000";
    span.title = "depth " + token.depth + (token.label ? ", " + token.label : "");
    span.addEventListener("click", function () {{
      document.querySelectorAll(".tok.selected").forEach(function (e) {{ e.classList.remove("selected"); }});
      span.classList.add("selected");
      show(token);
    }});
    div.appendChild(span);
    count += 1;
  }});
  blocks.appendChild(div);
}});
document.body.dataset.rendered = count;
// #token=B,T in the address opens token T of block B (a link to one token, or a screenshot)
const chosen = /^#token=([0-9]+),([0-9]+)$/.exec(location.hash);
if (chosen) {{
  const block = document.querySelectorAll(".block")[Number(chosen[1])];
  const span = block && block.querySelectorAll(".tok")[Number(chosen[2])];
  if (span) span.click();
}}
</script>
</body></html>
"""


def render_html(
    model: CausalLMModule, reports: list[PassReport], decode: Any, title: str, top_k: int = 5, extra_html: str = ""
) -> str:
    """A self-contained page (no network, no external script): every token coloured by its depth,
    a legend, the summary, and on click the token's scores, per-pass predictions and NLLs.
    `extra_html`: more content (e.g. a per-label table), already escaped."""
    passes = reports[0].n_passes
    data = {
        "passes": passes,
        "unit": reports[0].unit,
        "units": plural(reports[0].unit),
        "colours": {d: depth_colour(d, passes) for d in range(0, passes + 1)},
        "summary": summary(model, reports),
        "blocks": [_token_data(r, decode, top_k) for r in reports],
    }
    # `</` cannot end the script from inside a JSON string
    payload = json.dumps(data, allow_nan=False, default=_no_nan).replace("</", "<\\/")
    return PAGE.format(title=html.escape(title), data=payload, extra=extra_html)


def plural(unit: str) -> str:
    return {"pass": "passes"}.get(unit, unit + "s")


def _no_nan(value: Any) -> Any:
    raise TypeError(f"not JSON: {value!r}")


def render_ansi(model: CausalLMModule, reports: list[PassReport], decode: Any) -> str:
    """The depth map in the terminal: each token on a background by its depth, a legend and the
    summary line."""
    passes = reports[0].n_passes
    lines = [
        "depth: "
        + " ".join(
            f"\x1b[48;5;{depth_colour(d, passes, ANSI_PALETTE)}m\x1b[{'97' if d > passes / 2 else '30'}m {d} \x1b[0m"
            for d in range(1, passes + 1)
        )
    ]
    for report in reports:
        cells = []
        for token, depth in zip(report.tokens, report.depth, strict=True):
            colour = depth_colour(depth, passes, ANSI_PALETTE)
            text = decode(token).replace("\n", "\u21b5")
            cells.append(f"\x1b[48;5;{colour}m\x1b[{'97' if depth > passes / 2 else '30'}m{text}\x1b[0m")
        lines.append("".join(cells))
    s = summary(model, reports)
    full = "" if s["nll_full_depth"] is None else f", {s['nll_full_depth']:.4f} at full depth"
    lines.append(
        f"{s['tokens']} tokens: mean depth {s['depth_mean']:.3f} of {s['passes']} {plural(s['unit'])}, "
        f"{s['flops_x_vanilla']:.3f}x vanilla FLOPs per token; mean NLL {s['nll']:.4f} as run{full}"
    )
    return "\n".join(lines)


def depth_figure_of_tokens(reports: list[PassReport], decode: Any, per_line: int = 32):
    """A matplotlib figure of the depth map (tokens in a grid, coloured by depth), for TensorBoard."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = reports[0].n_passes
    rows = [r for report in reports for r in _chunks(report, per_line)]
    fig, ax = plt.subplots(figsize=(per_line * 0.32, 0.32 * len(rows) + 0.6))
    for y, row in enumerate(rows):
        for x, (token, depth) in enumerate(row):
            ax.add_patch(plt.Rectangle((x, -y - 1), 1, 1, color=depth_colour(depth, passes)))
            ax.text(x + 0.5, -y - 0.5, decode(token)[:3], ha="center", va="center", fontsize=6, family="monospace")
    ax.set_xlim(0, per_line)
    ax.set_ylim(-len(rows), 0)
    ax.axis("off")
    ax.set_title(f"depth per token (light: 1 {reports[0].unit}, dark: {passes})", fontsize=8)
    fig.tight_layout()
    return fig


def _chunks(report: PassReport, n: int) -> list[list[tuple[int, int]]]:
    pairs = list(zip(report.tokens, report.depth, strict=True))
    return [pairs[i : i + n] for i in range(0, len(pairs), n)] or [[]]
