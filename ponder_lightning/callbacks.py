"""Callbacks the CLI always installs; TensorBoard names are documented in docs/training.md, "Reading TensorBoard"."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelSummary, ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_summary.model_summary import get_formatted_model_size, get_human_readable_count

from ponder_lightning.gates import FirstPassOnly, FullDepth, Gate
from ponder_lightning.models.base import CausalLMModule
from ponder_lightning.models.metrics import DepthDifficulty, depth_by_decile, spearman
from ponder_lightning.models.recurrent import RecurrentLM
from ponder_lightning.nn.recurrence import Trace
from ponder_lightning.upstream import RICH_AVAILABLE, summary_of, summary_rows, throughputs_of

#: A continuing token whose feedback is scaled by less than this runs a nearly dead pass.
WEAK_FEEDBACK = 0.05
#: The collapse warning fires once this share of continuing tokens is weak at some decision ...
COLLAPSE_SHARE = 0.5
#: The other collapse, by default: the tokens' mean depth stays below this many passes, i.e. the gate halts
#: (nearly) every token after its first pass and the model has become a one-pass model.
ONE_PASS_DEPTH = 1.05
#: Either warning fires after this many training steps in a row.
COLLAPSE_STEPS = 20
_SEE = "docs/ablations.md, 'How a gate collapses'"
COLLAPSE_WARNINGS = {
    "weak_feedback": f"gate collapse at step {{step}}: for {COLLAPSE_STEPS} steps over {COLLAPSE_SHARE:.0%} of "
    f"the tokens that go on were fed back with a gate score below {WEAK_FEEDBACK} (passes that barely change the "
    f"output): try regularizer operand 'log_score' ({_SEE})",
    "one_pass": f"gate collapse at step {{step}}: for {COLLAPSE_STEPS} steps mean depth stayed below "
    f"{{one_pass_depth}} passes, a one-pass model paying for its gates: lower regularizer lam or k_max, gate "
    f"feedback 'score' ({_SEE})",
}


def gate_health(gate: Gate, trace: Trace) -> dict[str, float]:
    """Per decision i, over the tokens that ran iteration i: the mean score, the fraction that
    halted, and among those that went on the mean feedback scale and the share with a scale below
    WEAK_FEEDBACK (their next pass barely differs from the last: a collapsed gate)."""
    stats: dict[str, float] = {}
    for i, scores in enumerate(trace.scores):
        active, went_on = trace.active[i], trace.active[i + 1]
        if scores is None or not active.any():
            continue
        stats[f"score_mean/iter_{i}"] = float(scores[active].float().mean())
        stats[f"halted_fraction/iter_{i}"] = float(1 - went_on.sum() / active.sum())
        if went_on.any():
            scale = gate.feedback_scale(scores.detach())[went_on].float()
            stats[f"continuing_scale_mean/iter_{i}"] = float(scale.mean())
            stats[f"weak_continuing_fraction/iter_{i}"] = float((scale < WEAK_FEEDBACK).float().mean())
    return stats


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
    (tokens/s per device), `train/device/flops_per_sec` and, on GPUs with a known peak, MFU
    (`train/device/mfu`).

    Args:
        window_size: batches averaged per reading (short, so that short CPU runs log it too).
        peak_flops: the chip's peak FLOP/s per device for MFU (`fit --peak_tflops`). By default
            Lightning's table, which misses some names (e.g. 'NVIDIA H200') and lists Hopper's
            with-sparsity figures (twice the dense peak, so half the MFU one usually quotes).
    """

    def __init__(self, window_size: int = 5, peak_flops: float | None = None) -> None:
        super().__init__(batch_size_fn=_batch_rows, length_fn=_batch_tokens, window_size=window_size, separator="/")
        self.peak_flops = peak_flops

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_flops is not None:
            self.available_flops = self.peak_flops
            for throughput in throughputs_of(self).values():
                throughput.available_flops = self.peak_flops


class FlopsModelSummary(ModelSummary):
    """Lightning's model summary at the start of `fit` (a Rich table when Rich is installed) with
    the FLOPs this library counts instead of Lightning's.

    Lightning fills its FLOPs column and `Total FLOPs` by running `example_input_array` under
    torch's FLOP counter; these models define none, so both read 0. Here the per-layer column is
    dropped and the total is the analytic count (`ponder_lightning/flops.py`), `Training FLOPs per
    step`: forward + backward (3 x forward) with every token at full depth, for one optimizer step
    (`data.batch_size` x `seq_len` tokens, x gradient accumulation). Per device it is the model's
    `flops_per_batch`, the figure behind TokenThroughput's FLOP/s and MFU.
    """

    FLOPS_LABEL = "Training FLOPs per step (analytic: forward + backward, full depth)"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        summary = summary_of(self, trainer, pl_module)
        if summary is None:
            return
        columns = [(name, values) for name, values in summary_rows(summary) if name != "FLOPs"]
        trainable, total, modes = summary.trainable_parameters, summary.total_parameters, summary.total_training_modes
        totals = [
            ("Trainable params", get_human_readable_count(trainable)),
            ("Non-trainable params", get_human_readable_count(total - trainable)),
            ("Total params", get_human_readable_count(total)),
            ("Total estimated model params size (MB)", get_formatted_model_size(summary.model_size)),
            ("Modules in train mode", str(modes["train"])),
            ("Modules in eval mode", str(modes["eval"])),
        ]
        flops = training_flops_per_step(trainer, pl_module)
        if flops is not None:
            totals.append((self.FLOPS_LABEL, f"{flops:.3g}"))
        if trainer.is_global_zero:
            print_model_summary(columns, totals)


def ponders(module: L.LightningModule) -> bool:
    """Whether `module` is one of this library's models running more than one pass per token."""
    return isinstance(module, CausalLMModule) and module.n_iterations > 1


def training_flops_per_step(trainer: L.Trainer, pl_module: L.LightningModule) -> float | None:
    """Analytic training FLOPs of one optimizer step over all devices (None before `setup` knows
    the data's seq_len)."""
    per_batch = pl_module.flops_per_batch if isinstance(pl_module, CausalLMModule) else None
    if per_batch is None:
        return None
    return per_batch * trainer.world_size * trainer.accumulate_grad_batches


def print_model_summary(columns: list[tuple[str, list[str]]], totals: list[tuple[str, str]]) -> None:
    """A table of `columns` (name, one value per layer) and the `totals` lines under it."""
    rows = list(zip(*(values for _, values in columns), strict=True))
    if RICH_AVAILABLE:
        from rich import get_console
        from rich.table import Table

        table = Table(header_style="bold magenta")
        for name, _ in columns:
            right = name in ("Params", "Params per Device", "In sizes", "Out sizes")
            table.add_column(
                name, justify="right" if right else "left", style="dim" if name == " " else None, no_wrap=name == "Name"
            )
        for row in rows:
            table.add_row(*map(str, row))
        grid = Table.grid(expand=True)
        grid.add_column()
        for label, value in totals:
            grid.add_row(f"[bold]{label}[/]: {value}")
        console = get_console()
        console.print(table)
        console.print(grid)
        return
    widths = [max([len(name), *(len(str(v)) for v in values)]) for name, values in columns]
    rule = "-" * (sum(widths) + 3 * len(widths))
    lines = [" | ".join(f"{name:<{w}}" for (name, _), w in zip(columns, widths, strict=True)), rule]
    lines += [" | ".join(f"{str(v):<{w}}" for v, w in zip(row, widths, strict=True)) for row in rows]
    lines += [rule, *(f"{value:<10} {label}" for label, value in totals)]
    rank_zero_info("\n" + "\n".join(lines))


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

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast in distributed runs: every rank must take part
        if self.history and trainer.is_global_zero:
            context = getattr(trainer.datamodule, "seq_len", pl_module.config.max_seq_len)
            print(format_summary(self.history, pl_module, log_dir, context))


def format_summary(history: list[dict[str, float]], model: L.LightningModule, log_dir: str | None, context: int) -> str:
    """`context`: the attention context the validation FLOPs were counted at (the data seq_len)."""
    first, last = history[0], history[-1]
    lines = [
        "",
        f"== {model_name(model)} summary ==",
        f"val ppl: {first['val/ppl']:.2f} at the first check -> "
        f"{last['val/ppl']:.2f} at the last ({len(history)} checks)",
    ]
    if ponders(model):
        fractions = [last[f"val/active_fraction/iter_{i}"] for i in range(model.n_iterations)]
        full = model.realised_flops([1.0] * model.n_iterations, context)["x_vanilla"]
        halted = 1 - sum(fractions) / len(fractions)
        lines += [
            f"mean depth: {last['val/depth_mean']:.3f} of {model.n_iterations} iterations "
            f"({100 * halted:.1f}% of token-iterations halted)",
            "active fraction per iteration: " + ", ".join(f"{f:.3f}" for f in fractions),
            f"inference FLOPs per token: {last['val/flops_x_vanilla']:.2f}x vanilla "
            f"(the same model at full depth: {full:.2f}x)",
        ]
        if "val/ppl_full_depth" in last:
            rho = last["val/depth_spearman/nll_full_depth"]
            lines.append(
                f"the same weights with no token halted: val ppl {last['val/ppl_full_depth']:.2f} (learned depth: "
                f"{last['val/ppl']:.2f}); first pass only: {last['val/ppl_first_pass']:.2f}; depth vs full-depth NLL: "
                + (
                    "n/a (every token ran the same depth)"
                    if math.isnan(rho)
                    else f"Spearman {rho:+.3f} (> 0: harder tokens get more passes)"
                )
            )
    labels = [k.removeprefix("val/label_nll/") for k in last if k.startswith("val/label_nll/")]
    if labels:  # a synthetic task (LabelMonitor): what each kind of token cost and got
        lines.append(
            "per label at the last check (NLL / mean depth): "
            + ", ".join(
                f"{name} {last[f'val/label_nll/{name}']:.3f} / {last[f'val/label_depth/{name}']:.2f}" for name in labels
            )
        )
        if "val/auroc_depth_multi_step" in last:
            auroc = last["val/auroc_depth_multi_step"]
            lines.append(f"AUROC of depth, k >= 2 vs k = 1 tokens: {auroc:.3f} (0.5: depth ignores need)")
    if log_dir:
        lines.append(f"TensorBoard logs: {log_dir}  (tensorboard --logdir {log_dir})")
    return "\n".join(lines)


class GateHealthMonitor(Callback):
    """`train/gate/...` in TensorBoard at each training step of a model whose gate halts (per
    decision: mean score, halted fraction, the continuing tokens' feedback scale; the ponder
    loss's selection), and one warning when the gate has collapsed: continuing tokens fed back at
    nearly zero weight, or (nearly) every token halted after one pass (docs/ablations.md, "How a
    gate collapses"). Read from the step's trace, so it costs no forward.

    `one_pass_depth`: the mean depth below which the second warning counts a step. The default
    suits text, where a gate that halts nearly everything has stopped pondering; on a task where
    that is the right depth (the synthetic suite: about 1.05 passes needed on average), set it
    below the task's need, e.g. `GateHealthMonitor` with `one_pass_depth: 1.01` in the trainer's
    callbacks (the CLI then installs no default one)."""

    def __init__(self, one_pass_depth: float = ONE_PASS_DEPTH) -> None:
        self.one_pass_depth = one_pass_depth
        self._collapse_steps = dict.fromkeys(COLLAPSE_WARNINGS, 0)
        self._step = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = trainer.global_step  # the step this batch trains (the regulariser's k is that step's)

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(pl_module, RecurrentLM) or not isinstance(outputs, dict) or "trace" not in outputs:
            return
        if not pl_module.gate_active or not pl_module.gate.can_halt:
            return
        trace = outputs["trace"]
        stats = gate_health(pl_module.gate, trace)
        loss_set = pl_module.regularizer.describe(
            trace.scores, trace.active[:-1], self._step, continuing=trace.active[1:]
        )
        for name, value in {**stats, **{f"ponder_loss/{k}": v for k, v in loss_set.items()}}.items():
            pl_module.log(f"train/gate/{name}", value)
        weak = max((v for k, v in stats.items() if k.startswith("weak_continuing")), default=0.0)
        symptoms = {
            "weak_feedback": weak > COLLAPSE_SHARE,
            "one_pass": float(trace.active_fractions().sum()) < self.one_pass_depth,
        }
        for kind, present in symptoms.items():
            self._collapse_steps[kind] = self._collapse_steps[kind] + 1 if present else 0
            if self._collapse_steps[kind] == COLLAPSE_STEPS:
                rank_zero_warn(COLLAPSE_WARNINGS[kind].format(step=self._step, one_pass_depth=self.one_pass_depth))


class DifficultyMonitor(Callback):
    """Opt-in (`--trainer.callbacks+=ponder_lightning.callbacks.DifficultyMonitor`; on in the
    demo and the studies): at each validation of a model whose gate halts tokens, every batch run
    again at full depth and after the first pass only, on the same weights (two extra forwards a
    batch). Logs `val/ppl_full_depth` (the dead-pass check: equal to `val/ppl`, the passes the gate
    skips or keeps at s ~ 0 add nothing), `val/ppl_first_pass`, and Spearman's rank correlation of
    depth with each NLL (`val/depth_spearman/*`: difficulty measured independently of the depth a
    token got); the depth figure (`DepthMonitor`) adds the mean depth per decile of the first."""

    def __init__(self) -> None:
        self.metric = DepthDifficulty()
        #: The last validation's mean depth per decile of NLL at full depth (None before one).
        self.deciles: list[dict[str, float]] | None = None

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        if trainer.sanity_checking or not (isinstance(pl_module, RecurrentLM) and pl_module.measures_difficulty):
            return
        full, _ = pl_module.token_nll(batch, FullDepth(pl_module.gate))
        first, _ = pl_module.token_nll(batch, FirstPassOnly(pl_module.gate))
        self.metric.to(full.device).update(outputs["depth"], full, first)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.deciles = None  # never a past validation's

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.metric.update_called:
            return
        result = self.metric.compute()  # gathered over ranks
        self.metric.reset()
        self.deciles = depth_by_decile(result["nll_full_depth"], result["depth"])
        pl_module.log_global("val/ppl_full_depth", torch.exp(result["nll_full_depth"].double().mean()).float())
        pl_module.log_global("val/ppl_first_pass", torch.exp(result["nll_first_pass"].double().mean()).float())
        for name in ("nll_full_depth", "nll_first_pass"):
            pl_module.log_global(f"val/depth_spearman/{name}", spearman(result["depth"], result[name]))


class DepthMonitor(Callback):
    """TensorBoard views of adaptive depth: a histogram of the gate scores of each decision (over
    the tokens that were active there) every `log_every_n_steps`, and at each validation a
    depth-vs-NLL figure (tokens per depth and their mean NLL). Silent for one-pass models and
    without a TensorBoard logger."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        trace = outputs.get("trace") if isinstance(outputs, dict) else None
        writer = _tensorboard(trainer)
        if trace is None or writer is None or (trainer.global_step % max(trainer.log_every_n_steps, 1)):
            return
        # one score per decision, one mask per iteration: the last iteration has no decision
        for i, (scores, active) in enumerate(zip(trace.scores, trace.active, strict=False)):
            if scores is not None and active.any():
                writer.add_histogram(f"gate/scores_iter_{i}", scores[active].float().cpu(), trainer.global_step)
        writer.add_histogram("depth/tokens", trace.depth()[trace.active[0]].float().cpu(), trainer.global_step)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs before the module's own hook, which resets the metrics the report reads; every
        # rank computes it (the metrics synchronise), rank 0 draws it.
        if trainer.sanity_checking or not ponders(pl_module):
            return
        report = pl_module.depth_report()
        writer = _tensorboard(trainer)
        # a DifficultyMonitor, if installed, ran its hook first (callbacks run in order; the
        # configured ones come before the CLI's defaults)
        deciles = next((c.deciles for c in trainer.callbacks if isinstance(c, DifficultyMonitor)), None)
        if report.table and writer is not None:
            writer.add_figure("val/depth_vs_nll", depth_figure(report.table, deciles), trainer.global_step)


class DepthMapMonitor(Callback):
    """Opt-in (`--trainer.callbacks+=ponder_lightning.callbacks.DepthMapMonitor`): at each
    validation, the depth map of the first `blocks` validation blocks as a TensorBoard image
    (`val/depth_map`: tokens coloured by the passes they ran, `depth_map.py`). One extra forward
    per block on rank 0; silent without a TensorBoard logger or for one-pass models."""

    def __init__(self, blocks: int = 2, tokens_per_line: int = 32) -> None:
        if blocks < 1 or tokens_per_line < 1:
            raise ValueError(
                f"DepthMapMonitor blocks and tokens_per_line must be >= 1, got {blocks}, {tokens_per_line}"
            )
        self.blocks, self.tokens_per_line = blocks, tokens_per_line
        self._rows: Any = None

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx == 0 and not isinstance(batch, dict):
            self._rows = batch[: self.blocks].detach()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from ponder_lightning.depth_map import depth_figure_of_tokens, pass_report, token_decoder

        writer = _tensorboard(trainer)
        rows, self._rows = self._rows, None
        if rows is None or writer is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if not ponders(pl_module):
            return
        decode = token_decoder(trainer.datamodule.tokenizer_obj)
        reports = [pass_report(pl_module, row[:-1], row[1:].tolist()) for row in rows]
        writer.add_figure(
            "val/depth_map", depth_figure_of_tokens(reports, decode, self.tokens_per_line), trainer.global_step
        )


class LabelMonitor(Callback):
    """On a synthetic task whose tokens are labelled by the steps they take (`data.synthetic`):
    at each validation, the mean depth and NLL of each label's tokens (`val/label_depth/<label>`,
    `val/label_nll/<label>`) and the AUROC of depth for tokens needing two or more steps against
    those needing one (`val/auroc_depth_multi_step`). Read from what the validation step returns,
    so it costs no extra forward; silent on other data. Depth is a whole number of passes, so the
    AUROC is computed exactly from per-depth counts, which add up over ranks."""

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from ponder_lightning.data.synthetic import is_synthetic

        self._counts = self._nll = None
        self._active = is_synthetic(getattr(trainer.datamodule, "data_files", None))

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        from ponder_lightning.data.synthetic import MAX_LABEL, target_labels

        if not self._active or not isinstance(outputs, dict) or isinstance(batch, dict):
            return
        labels = torch.tensor(target_labels(batch)).flatten()
        depth, nll = outputs["depth"].long().cpu(), outputs["nll"].double().cpu()
        if self._counts is None:  # [label + 1 (unknown = -1 at 0), depth]
            self._counts = torch.zeros(MAX_LABEL + 2, pl_module.n_iterations + 1, dtype=torch.float64)
            self._nll = torch.zeros(MAX_LABEL + 2, dtype=torch.float64)
        rows = labels + 1
        self._counts.index_put_((rows, depth), torch.ones_like(nll), accumulate=True)
        self._nll.index_add_(0, rows, nll)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from ponder_lightning.data.synthetic import STEPS, label_name

        if not self._active or self._counts is None or trainer.sanity_checking:
            return
        device = pl_module.device
        counts = trainer.strategy.reduce(self._counts.to(device), reduce_op="sum").cpu()
        nll = trainer.strategy.reduce(self._nll.to(device), reduce_op="sum").cpu()
        depths = torch.arange(counts.shape[1], dtype=torch.float64)
        for row in range(1, counts.shape[0]):  # row 0: unlabelled tokens
            tokens = counts[row].sum()
            if tokens > 0:
                name = label_name(row - 1)
                pl_module.log(f"val/label_depth/{name}", float((counts[row] * depths).sum() / tokens))
                pl_module.log(f"val/label_nll/{name}", float(nll[row] / tokens))
        single, multi = counts[STEPS + 2], counts[STEPS + 3 :].sum(0)
        if single.sum() > 0 and multi.sum() > 0:
            pl_module.log("val/auroc_depth_multi_step", depth_auroc(multi, single))


def depth_auroc(positive: Any, negative: Any) -> float:
    """AUROC of depth from per-depth counts of two classes: the chance that a random positive ran
    deeper than a random negative, ties counted half."""
    p, n = positive / positive.sum(), negative / negative.sum()
    below = n.cumsum(0) - n  # P(negative < d)
    return float((p * (below + 0.5 * n)).sum())


def _tensorboard(trainer: L.Trainer) -> Any:
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def depth_figure(table: list[tuple[int, int, float]], deciles: list[dict[str, float]] | None = None) -> Any:
    """Tokens per depth, with the mean NLL each depth's tokens reached after their passes (an
    outcome, not a difficulty: easy tokens halted early look easy); and, when given, the mean
    depth per decile of a difficulty measured independently of depth (NLL at full depth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths, counts, nlls = zip(*table, strict=True)
    fig, axes = plt.subplots(1, 2 if deciles else 1, figsize=(10 if deciles else 5, 3.2), squeeze=False)
    ax = axes[0][0]
    ax.bar(depths, counts, color="#9ab")
    ax.set_xlabel("depth (iterations run)")
    ax.set_ylabel("tokens")
    nll_axis = ax.twinx()
    nll_axis.plot(depths, nlls, "o-", color="#c33")
    nll_axis.set_ylabel("mean NLL after its passes", color="#c33")
    ax.set_xticks(list(depths))
    if deciles:
        right = axes[0][1]
        right.plot([d["decile"] for d in deciles], [d["depth"] for d in deciles], "o-", color="#36c")
        right.set_xlabel("difficulty decile (NLL at full depth, easiest first)")
        right.set_ylabel("mean depth")
        right.set_xticks([d["decile"] for d in deciles])
    fig.tight_layout()
    return fig


def model_name(model: L.LightningModule) -> str:
    """The model's own class name (FSDP2's fully_shard swaps in a generated FSDP<Name> subclass)."""
    return next(c.__name__ for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))
