"""lm-evaluation-harness on our checkpoints, with the compute each score cost.

`PonderLightningLM` is an `lm_eval.api.model.LM` registered as ``ponder_lightning``; importing
this module registers it. It scores with the model's own adaptive depth and keeps the books:
`compute_report()` gives the mean depth, the active fraction per iteration and the inference
FLOPs per token (x vanilla) of everything it ran, overall and per request type, and lm_eval's
results carry the same report under ``results["config"]["ponder_lightning"]``.

From Python::

    import lm_eval
    from ponder_lightning.lm_eval_adapter import PonderLightningLM
    lm = PonderLightningLM(checkpoint="lightning_logs/version_0/checkpoints/last.ckpt", batch_size=8)
    results = lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])
    lm.compute_report()

or ``lm_eval.simple_evaluate(model="ponder_lightning", model_args="checkpoint=last.ckpt,batch_size=8", ...)``
once this module is imported. lm-eval (0.4) offers no hook (entry point or plugin path) through
which an installed package registers a model for its own command line, so ``lm_eval --model
ponder_lightning`` cannot work by installation alone; from the shell use::

    python -m ponder_lightning lm_eval --checkpoint last.ckpt --tasks hellaswag,arc_easy [--limit 100]

(``python -m ponder_lightning.lm_eval_adapter`` takes the same arguments), or export the model with
``export --format transformers`` and run lm-eval's own ``hf`` backend on that directory.

model_args: ``checkpoint`` (anything `load_checkpoint` reads), ``tokenizer`` (default: the one
recorded in the checkpoint), ``batch_size``, ``max_length`` (default: the data seq_len the
checkpoint was trained at, else the model's max_seq_len),
``max_gen_toks`` (default 256), ``device``, ``dtype`` (e.g. bfloat16), ``tau`` (override the
gate's halting threshold). A model passed in Python (``model=``) is used in place, as lm_eval's
``hf`` backend uses a model object: it is moved to ``device``, cast to ``dtype``, put in eval
mode; its gate is never changed (``tau`` re-thresholds the gate's scores for this adapter's
calls, as ``evaluate --tau`` does, with ``gates.AtThreshold``).

Scoring conventions follow lm_eval's Hugging Face model: a context's trailing whitespace moves to
the continuation, an empty context is replaced by the EOS token, inputs are left-truncated to
``max_length``, log-probabilities are over the model's full (padded) vocabulary, and
`loglikelihood_rolling` uses lm_eval's disjoint rolling windows with EOS as the prefix token.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

try:
    import lm_eval.models  # noqa: F401 - fills the model registry first (lm_eval fills it lazily only while empty)
    from lm_eval import utils as lm_eval_utils
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "ponder_lightning.lm_eval_adapter needs lm-evaluation-harness: pip install 'ponder_lightning[lm_eval]' "
        "(or pip install 'lm-eval>=0.4')"
    ) from exc

from ponder_lightning.cli_errors import add_trust_flag, bounded, count_or_fraction, output_file
from ponder_lightning.errors import UserError
from ponder_lightning.gates import AtThreshold, Gate
from ponder_lightning.io.compat import check_tokenizer_fits

logger = logging.getLogger(__name__)

MODEL_NAME = "ponder_lightning"
REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")

# `python -m ponder_lightning.lm_eval_adapter` runs this file as __main__ and then imports it under
# its real name (see the bottom): register only that copy, or lm_eval would see two classes
# under one name and refuse the second.
_register = register_model(MODEL_NAME) if __name__ != "__main__" else (lambda cls: cls)


@dataclass
class _Tally:
    """Compute of one kind of request: real tokens run, per-iteration active token counts, and
    the rows (sequences) they came in, for the attention context of the FLOPs estimate."""

    tokens: int = 0
    active: list[int] = field(default_factory=list)
    rows: int = 0
    row_tokens: int = 0

    def add(self, active_counts: Sequence[int], rows: int, row_tokens: int) -> None:
        if not self.active:
            self.active = [0] * len(active_counts)
        self.active = [a + int(c) for a, c in zip(self.active, active_counts, strict=True)]
        self.tokens += int(active_counts[0]) if active_counts else 0
        self.rows += rows
        self.row_tokens += row_tokens

    def merged(self, other: _Tally) -> _Tally:
        out = _Tally(self.tokens, list(self.active), self.rows, self.row_tokens)
        if other.tokens:
            out.add(other.active, other.rows, other.row_tokens)
        return out


@_register
class PonderLightningLM(LM):
    """An lm_eval LM over a ponder_lightning model (see the module docstring).

    Pass ``checkpoint`` (a path `load_checkpoint` reads) or, from Python, ``model`` (a
    `CausalLMModule`) with ``tokenizer`` (a spec for `load_tokenizer` or a `Tokenizer`).
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        tokenizer: Any = None,
        batch_size: int | str | None = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        device: str | None = None,
        dtype: str | None = None,
        tau: float | None = None,
        model: Any = None,
        max_batch_size: int | None = None,  # passed by simple_evaluate; batch sizes are fixed here
        trust_checkpoint: bool = False,
        **unused: Any,
    ) -> None:
        super().__init__()
        from ponder_lightning.data.tokenizer import Tokenizer, load_tokenizer

        if unused:
            logger.warning("ponder_lightning: ignoring unknown model_args %s", sorted(unused))
        if (checkpoint is None) == (model is None):
            raise UserError(
                "pass exactly one of checkpoint=<path> (e.g. "
                "lightning_logs/version_0/checkpoints/last.ckpt) or model=<CausalLMModule>"
            )
        data_args: dict[str, Any] = {}
        if checkpoint is not None:
            from ponder_lightning.io.load import load_checkpoint

            model, data_args = load_checkpoint(str(checkpoint), trusted=trust_checkpoint)
        if tokenizer is None:
            tokenizer = data_args.get("tokenizer")
            if tokenizer is None:
                raise UserError(
                    f"{checkpoint or type(model).__name__} records no tokenizer: pass tokenizer=<neox|bytes|path>"
                )
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(str(tokenizer))
        self.checkpoint = None if checkpoint is None else str(checkpoint)

        self._device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = model.to(self._device)
        if dtype not in (None, "auto", "float32"):
            model = model.to(getattr(torch, str(dtype)))
        self.model = model.eval()
        #: The gate this adapter runs in place of the model's own: None, or its scores re-thresholded.
        self.counterfactual: Gate | None = None
        self.tau = getattr(self.model.gate, "tau", None)  # latent-slot models (PonderLM-2/3) have no gate
        if tau is not None:
            if self.tau is None:
                raise UserError(f"tau={tau}: {type(self.model).__name__} has no gate with a halting threshold")
            if not 0 <= float(tau) <= 1:
                raise UserError(f"tau={tau} is out of range: a halting threshold is in [0, 1]")
            self.tau = float(tau)
            self.counterfactual = AtThreshold(self.model.gate, self.tau)

        named = f"tokenizer {tokenizer if isinstance(tokenizer, str) else self.tokenizer.name}"
        check_tokenizer_fits(named, self.tokenizer.vocab_size, self.model.config.vocab_size)
        context = self.model.config.max_seq_len
        # The model's positions beyond the blocks it was trained on are untrained: default to those.
        trained = data_args.get("seq_len")
        self.max_length = int(max_length) if max_length is not None else min(int(trained or context), context)
        if not 2 <= self.max_length <= context:
            raise UserError(f"max_length={max_length} must be between 2 and the model's max_seq_len={context}")
        self.batch_size = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        if self.batch_size < 1:
            raise UserError(f"batch_size={batch_size} must be at least 1")
        self.max_gen_toks = int(max_gen_toks)
        self.reset_compute()

    # -- lm_eval's interface ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and every rolling window's first token) is conditioned on."""
        return self.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding would produce it) per request."""
        pairs = [self._encode_pair(*req.args) for req in requests]
        results = self._score(pairs, "loglikelihood")
        for req, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in disjoint windows of at most max_length tokens."""
        windows, owner = [], []
        for index, req in enumerate(requests):
            tokens = self.tok_encode(req.args[0])
            for window in lm_eval_utils.get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
            ):
                windows.append(lm_eval_utils.make_disjoint_window(window))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._score(windows, "loglikelihood_rolling"), strict=True):
            totals[index] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Adaptive-depth decoding (`ponder_lightning.generate`), batched per identical
        generation arguments; rows stop at EOS (and at any `until` string that is one token) and
        the text is cut at the first `until` string."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(index)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1] or {})
            texts = self._generate_group([requests[i].args[0] for i in members], kwargs)
            for index, text in zip(members, texts, strict=True):
                results[index] = text
                self.cache_hook.add_partial("generate_until", requests[index].args, text)
        return results  # type: ignore[return-value]

    def get_model_info(self) -> dict[str, Any]:
        """Added by `simple_evaluate` to results["config"] once every task has run: the compute
        report rides along with the scores (and is logged here, at the end of the run)."""
        report = self.compute_report()
        logger.info("ponder_lightning compute:\n%s", format_compute_report(report))
        return {MODEL_NAME: {"checkpoint": self.checkpoint, "compute": report}}

    # -- compute ---------------------------------------------------------------------------
    def reset_compute(self) -> None:
        self._tallies = {kind: _Tally() for kind in REQUEST_TYPES}

    def compute_report(self) -> dict[str, Any]:
        """Mean depth, active fraction per iteration and FLOPs per token (x vanilla) of every
        token run so far, overall and per request type (`loglikelihood` requests count every
        input token; `generate_until` the generated tokens, as `generate` reports them). The
        FLOPs use each kind's mean sequence length as the attention context."""
        total = _Tally()
        for tally in self._tallies.values():
            total = total.merged(tally)
        report = self._summarise(total)
        report["model"] = type(self.model).__name__
        report["n_iterations"] = int(self.model.n_iterations)
        report["tau"] = self.tau
        report["by_request_type"] = {kind: self._summarise(t) for kind, t in self._tallies.items() if t.tokens}
        return report

    def _summarise(self, tally: _Tally) -> dict[str, Any]:
        if not tally.tokens:
            return {"tokens": 0, "mean_depth": None, "active_fractions": None, "flops_x_vanilla": None, "context": None}
        fractions = [a / tally.active[0] for a in tally.active]
        context = max(1, round(tally.row_tokens / tally.rows))
        return {
            "tokens": tally.tokens,
            "mean_depth": sum(tally.active) / tally.tokens,
            "active_fractions": fractions,
            "flops_x_vanilla": float(self.model.realised_flops(fractions, context)["x_vanilla"]),
            "context": context,
        }

    # -- scoring ---------------------------------------------------------------------------
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            return [self.prefix_token_id], self.tok_encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:  # "Answer: " + "X" is scored as "Answer:" + " X", as lm_eval's HF model does
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        context_ids = self.tok_encode(context)
        return context_ids, whole[len(context_ids) :]

    @torch.no_grad()
    def _score(self, pairs: Sequence[tuple[list[int], list[int]]], kind: str) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation and whether each of its tokens is the
        argmax. Rows are sorted longest first, right-padded in batches, left-truncated."""
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        rows = []
        for index, (context, continuation) in enumerate(pairs):
            if not continuation:
                continue
            if len(continuation) > self.max_length:
                raise UserError(
                    f"a continuation of {len(continuation)} tokens does not fit max_length={self.max_length}"
                )
            inputs = (list(context) + list(continuation))[-(self.max_length + 1) :][:-1]
            rows.append((index, inputs, list(continuation)))
        rows.sort(key=lambda row: -len(row[1]))
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            longest = len(batch[0][1])
            ids = torch.zeros(len(batch), longest, dtype=torch.long)
            valid = torch.zeros(len(batch), longest, dtype=torch.bool)
            for r, (_, inputs, _) in enumerate(batch):
                ids[r, : len(inputs)] = torch.tensor(inputs)
                valid[r, : len(inputs)] = True
            ids, valid = ids.to(self._device), valid.to(self._device)
            hidden, trace = self.model.hidden_states(ids, None if bool(valid.all()) else valid, self.counterfactual)
            counts = [int((a & valid).sum()) for a in trace.active]
            self._tallies[kind].add(counts, len(batch), int(valid.sum()))
            for r, (index, inputs, continuation) in enumerate(batch):
                end = len(inputs)
                logprobs = self.model.token_logprobs(hidden[r, end - len(continuation) : end]).float()
                target = torch.tensor(continuation, device=logprobs.device)
                score = logprobs.gather(-1, target.unsqueeze(-1)).sum()
                results[index] = (float(score), bool((logprobs.argmax(-1) == target).all()))
        return results

    # -- generation ------------------------------------------------------------------------
    def _generate_group(self, contexts: list[str], kwargs: dict[str, Any]) -> list[str]:
        from ponder_lightning.generate import generate

        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        eos_text = self.tokenizer.decode([self.tokenizer.eos_id])
        if eos_text and eos_text not in until:
            until.append(eos_text)
        max_new = int(kwargs.pop("max_gen_toks", None) or kwargs.pop("max_new_tokens", None) or self.max_gen_toks)
        max_new = max(1, min(max_new, self.max_length - 1))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if do_sample else 0.0
        if do_sample and temperature <= 0:
            temperature = 1.0
        top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
        seed = kwargs.pop("seed", None)
        if kwargs:
            logger.warning("ponder_lightning: generate_until ignores generation arguments %s", sorted(kwargs))
        stops = {self.tokenizer.eos_id}
        for text in until:  # stop early at one-token stop strings; the string cut below is what counts
            ids = self.tok_encode(text)
            if len(ids) == 1:
                stops.add(ids[0])

        budget = self.max_length - max_new
        prompts = [(self.tok_encode(c) or [self.prefix_token_id])[-budget:] for c in contexts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        texts: list[str] = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            with nullcontext() if self.counterfactual is None else self.model.with_gate(self.counterfactual):
                out = generate(
                    self.model,
                    [prompts[i] for i in chunk],
                    tokenizer=self.tokenizer,
                    max_new_tokens=max_new,
                    temperature=temperature,
                    top_k=None if top_k is None else int(top_k),
                    top_p=None if top_p is None else float(top_p),
                    stop_tokens=sorted(stops),
                    seed=None if seed is None else int(seed),
                )
            self._add_generation(out.depths, [len(prompts[i]) for i in chunk])
            for i, text in zip(chunk, out.texts, strict=True):
                texts[i] = _cut(text, until)
        return texts

    def _add_generation(self, depths: list[list[int]], prompt_lengths: list[int]) -> None:
        flat = [d for row in depths for d in row]
        if not flat:
            return
        counts = [sum(d > i for d in flat) for i in range(self.model.n_iterations)]
        row_tokens = sum(p + len(row) for p, row in zip(prompt_lengths, depths, strict=True))
        self._tallies["generate_until"].add(counts, len(depths), row_tokens)


def _cut(text: str, until: Iterable[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def format_compute_report(report: dict[str, Any]) -> str:
    """A Markdown table of `compute_report()`: one row per request type and the total."""
    lines = [
        f"{report['model']} ({report['n_iterations']} iterations"
        + (f", tau={report['tau']:g}" if isinstance(report.get("tau"), (int, float)) else "")
        + ")",
        "| requests | tokens | mean depth | active fraction per iteration | FLOPs x vanilla | context |",
        "|---|---|---|---|---|---|",
    ]
    rows = [(kind, row) for kind, row in report["by_request_type"].items()] + [("all", report)]
    for kind, row in rows:
        if not row["tokens"]:
            lines.append(f"| {kind} | 0 | - | - | - | - |")
            continue
        fractions = ", ".join(f"{f:.3f}" for f in row["active_fractions"])
        lines.append(
            f"| {kind} | {row['tokens']} | {row['mean_depth']:.3f} | "
            f"{fractions} | {row['flops_x_vanilla']:.3f} | {row['context']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m ponder_lightning.lm_eval_adapter") -> dict[str, Any]:
    """`python -m ponder_lightning lm_eval --checkpoint CKPT --tasks T1,T2 [...]` (also
    `python -m ponder_lightning.lm_eval_adapter ...`): run lm_eval tasks on a checkpoint; prints
    lm_eval's score table and the compute report."""
    import argparse
    from pathlib import Path

    import lm_eval
    from lm_eval.tasks import TaskManager

    parser = argparse.ArgumentParser(prog=prog, description=main.__doc__)
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a .ckpt written by `fit`, an FSDP checkpoint directory or an exported directory (either format)",
    )
    parser.add_argument("--tasks", required=True, help="comma-separated lm_eval task (or group) names")
    parser.add_argument("--include_path", default=None, help="a directory of extra task YAMLs")
    parser.add_argument(
        "--only_include_path",
        action="store_true",
        help="index only --include_path, not lm_eval's own tasks (saves ~10 s of start-up)",
    )
    parser.add_argument(
        "--limit",
        type=count_or_fraction,
        default=None,
        help="examples per task (a fraction if < 1); for quick checks only",
    )
    parser.add_argument("--num_fewshot", type=bounded(int, 0), default=None)
    parser.add_argument("--batch_size", type=bounded(int, 1), default=8)
    parser.add_argument(
        "--max_length",
        type=bounded(int, 2),
        default=None,
        help="tokens per scored window (default: the data seq_len the checkpoint was trained at, "
        "else the model's max_seq_len)",
    )
    parser.add_argument("--max_gen_toks", type=bounded(int, 1), default=256)
    parser.add_argument("--tokenizer", default=None, help="default: the one recorded in the checkpoint")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's, float32)")
    parser.add_argument(
        "--tau", type=bounded(float, 0.0, 1.0), default=None, help="override the gate's halting threshold, in [0, 1]"
    )
    parser.add_argument("--bootstrap_iters", type=bounded(int, 0), default=100000, help="0 skips standard errors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output",
        type=output_file,
        default=None,
        help="write results (scores + compute report) to this JSON file (its directory is checked first)",
    )
    add_trust_flag(parser)
    args = parser.parse_args(argv)

    if args.only_include_path and not args.include_path:
        raise UserError("--only_include_path needs --include_path DIR")
    task_manager = TaskManager(include_path=args.include_path, include_defaults=not args.only_include_path)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    known = set(task_manager.match_tasks(tasks))
    unknown = [t for t in tasks if t not in known and "*" not in t and not Path(t).is_file()]
    if unknown:  # before the model is loaded; lm_eval itself would fail with a KeyError
        where = args.include_path if args.only_include_path else "lm_eval's tasks"
        where += f" or {args.include_path}" if args.include_path and not args.only_include_path else ""
        raise UserError(
            f"--tasks: no task or group named {', '.join(unknown)} in {where}: check the spelling "
            "(`lm_eval ls tasks` lists them) or pass --include_path DIR with its YAML"
        )
    lm = PonderLightningLM(
        checkpoint=args.checkpoint,
        tokenizer=args.tokenizer,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_gen_toks=args.max_gen_toks,
        device=args.device,
        dtype=args.dtype,
        tau=args.tau,
        trust_checkpoint=args.trust_checkpoint,
    )
    limit = args.limit
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=args.num_fewshot,
        limit=limit,
        task_manager=task_manager,
        bootstrap_iters=args.bootstrap_iters,
        random_seed=args.seed,
        numpy_random_seed=args.seed,
        torch_random_seed=args.seed,
        fewshot_random_seed=args.seed,
        log_samples=False,
    )
    report = lm.compute_report()
    print(f"{type(lm.model).__name__} from {args.checkpoint}" + (f", limit {limit}" if limit is not None else ""))
    print(lm_eval_utils.make_table(results))
    if results.get("groups"):
        print(lm_eval_utils.make_table(results, "groups"))
    print(format_compute_report(report))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        keep = {k: results[k] for k in ("results", "groups", "versions", "n-shot", "configs", "config") if k in results}
        out.write_text(json.dumps(keep | {"compute": report}, indent=2, default=str))
        print(f"wrote {out}")
    return {"results": results, "compute": report}


if __name__ == "__main__":
    import sys

    from ponder_lightning.errors import user_error_in
    from ponder_lightning.lm_eval_adapter import main as registered_main  # the copy lm_eval knows

    try:
        registered_main()
    except Exception as err:
        cause = user_error_in(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
