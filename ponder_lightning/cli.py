"""Command line: LightningCLI (fit/validate/test/predict) with project defaults.

User mistakes (`UserError`) print as one line and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse.typing import import_object
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ponder_lightning.callbacks import (
    DepthMonitor,
    FitSummary,
    FlopsModelSummary,
    GateHealthMonitor,
    LabelMonitor,
    TokenThroughput,
)
from ponder_lightning.cli_errors import (
    active_fractions,
    add_trust_flag,
    bounded,
    non_empty_text,
    output_dir,
    output_file,
    tau_list,
)
from ponder_lightning.data import PileDataModule
from ponder_lightning.errors import UserError, user_error_in
from ponder_lightning.io.compat import (
    OPTIMIZER_ARGS,
    changed_args,
    check_ckpt_path,
    check_same_class,
    check_tokenizer_fits,
    check_weights_fit,
    describe_changes,
    read_checkpoint,
    saved_hparams,
    short_class,
    unknown_saved_args,
)
from ponder_lightning.io.load import check_saved_args, invalid_saved_args
from ponder_lightning.models import CausalLMModule
from ponder_lightning.parser_errors import parser_error_message
from ponder_lightning.progress import step_progress_bar
from ponder_lightning.training import SIGTERM_EXIT_CODE, find_last_checkpoint, last_checkpoint_dirs
from ponder_lightning.upstream import CLIHooks
from ponder_lightning.validation import PositiveInt


class PonderCLI(CLIHooks):
    def init_parser(self, **kwargs) -> LightningArgumentParser:
        # Parse errors are raised (not printed under ~60 lines of usage) so that `main` prints one
        # short line naming the field; see `parser_error_message`.
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The model's vocabulary follows the tokenizer (padded to a multiple of 128 by the model).
        parser.link_arguments("data.vocab_size", "model.init_args.tokenizer_vocab_size", apply_on="instantiate")
        parser.add_argument(
            "--checkpoint_every",
            type=PositiveInt | None,
            default=None,
            help="save a checkpoint every N optimizer steps "
            "(sets every_n_train_steps of the configured checkpoint callback)",
        )
        parser.add_argument(
            "--peak_tflops",
            type=float | None,
            default=None,
            help="peak TFLOP/s per device for the MFU in TensorBoard "
            "(e.g. 989 for dense bf16 on an H100/H200 SXM); default: Lightning's table",
        )

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        config_init = self.config_init.get(str(self.subcommand), self.config_init)
        config = {**(config_init.get("trainer") or {}), **kwargs}
        configured = list(config.get("callbacks") or [])
        added = []
        # Lightning's default bar shows `Epoch 0/-2` in step-based runs; ours counts steps. Only
        # when a bar is wanted and none was configured (Lightning rejects a bar with it disabled).
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in configured):
            added.append(step_progress_bar())
        # The gate's health, unless the config brings its own (with another collapse threshold).
        if not any(isinstance(c, GateHealthMonitor) for c in configured):
            added.append(GateHealthMonitor())
        # Lightning's summary prints `Total FLOPs: 0` (it counts FLOPs on an example input these
        # models do not define); ours prints the analytic training FLOPs per step. Lightning's
        # default is then switched off, or it logs that it skips it in favour of ours.
        wanted = config.get("enable_model_summary") is not False and not config.get("barebones")
        if wanted and not any(isinstance(c, ModelSummary) for c in configured):
            added.append(FlopsModelSummary())
            kwargs["enable_model_summary"] = False
        if added:
            kwargs["callbacks"] = [*configured, *added]
        return super().instantiate_trainer(**kwargs)

    def before_instantiate_classes(self) -> None:
        """`--checkpoint_every N` sets every_n_train_steps of the configured checkpoint callbacks."""
        if not self.subcommand:
            return
        config = self.config[self.subcommand]
        every = config.get("checkpoint_every")
        if every is None:
            return
        callbacks = config.trainer.get("callbacks") or []
        targets = [c for c in callbacks if str(c.get("class_path", "")).endswith("ModelCheckpoint")]
        if not targets:
            raise UserError(
                "--checkpoint_every needs a checkpoint callback in trainer.callbacks: use a config from configs/ "
                "(they configure ponder_lightning.training.AtomicModelCheckpoint) or add one"
            )
        for callback in targets:
            callback.init_args.every_n_train_steps = int(every)

    def check_ckpt_path(self) -> None:
        """Check `--ckpt_path` against the config before anything is built (see `resume.py`):
        fit resumes the configured model, the other subcommands use the checkpoint's arguments."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        config = self.config[sub]
        ckpt_path = config.get("ckpt_path")
        check_ckpt_path(ckpt_path, sub)
        if not ckpt_path or not Path(ckpt_path).expanduser().is_file():
            return  # 'last' (checked once resolved: `_resolve_last`) or an FSDP checkpoint directory
        saved = saved_hparams(ckpt_path)
        model = config.get("model")
        if not saved or model is None or not model.get("class_path"):
            return self.load_ckpt_arguments()
        check_same_class(model.class_path, saved.get("_class_path"), ckpt_path)
        model_class = import_object(model.class_path)
        unknown = unknown_saved_args(saved, model_class)
        configured = model.init_args.as_dict() if model.get("init_args") is not None else {}
        changes = changed_args(saved, configured)
        if sub == "fit":
            if unknown:
                rank_zero_warn(
                    f"--ckpt_path {ckpt_path} has model arguments {short_class(model.class_path)} no longer "
                    f"takes (renamed or removed): {', '.join(f'{k}={saved[k]!r}' for k in unknown)}; they "
                    "are ignored, the config's arguments are used"
                )
            changes = {
                k: v for k, v in changes.items() if k not in OPTIMIZER_ARGS
            }  # the optimizer says so itself on load
            if changes:
                rank_zero_info(
                    f"resuming from {ckpt_path} with model arguments changed "
                    f"from the checkpoint's: {describe_changes(changes)}"
                )
            return
        check_saved_args(saved, model_class, f"--ckpt_path {ckpt_path}")
        try:
            self.load_ckpt_arguments()
        except argparse.ArgumentError as err:  # a saved value the class's constraints now reject: not the config's
            raise invalid_saved_args(f"--ckpt_path {ckpt_path}", short_class(model.class_path), err) from None
        if changes:
            rank_zero_info(
                f"{sub} uses the model arguments saved in {ckpt_path}, where they differ "
                f"from the config's: {describe_changes(changes, used='checkpoint')}"
            )

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self.subcommand and self.config[self.subcommand].get("ckpt_path") == "last":
            self._resolve_last()
        check_model_fits_data(self.model, self.datamodule)
        if self.subcommand:
            self._check_weights_fit()

    def _resolve_last(self) -> None:
        """`--ckpt_path last` becomes the file Lightning would load (`find_last_checkpoint`, which
        needs the built trainer's callbacks and logger), checked like a file named on the command
        line; with none, `fit` says once that it starts from step 0 (the other subcommands stop)."""
        found = find_last_checkpoint(self.trainer)
        if found is None:
            where = ", ".join(last_checkpoint_dirs(self.trainer)) or "(no checkpoint callback)"
            if self.subcommand != "fit":
                raise UserError(f"--ckpt_path last: there is no last.ckpt in {where}: pass a checkpoint file")
            rank_zero_warn(f"--ckpt_path last: there is no last.ckpt in {where} yet: training starts from step 0")
        else:
            rank_zero_info(f"--ckpt_path last: {found}")
        for config in (self.config, self.config_init):
            config[self.subcommand].ckpt_path = found
        if found is None:
            return
        self.check_ckpt_path()
        if self.subcommand != "fit":  # the checkpoint's arguments replace the config's: build again,
            self.__dict__.pop("config_dump", None)  # with the hparams LightningCLI records dumped anew
            super().instantiate_classes()

    def _check_weights_fit(self) -> None:
        """Settings that change the weights' shapes (the tokenizer, size, n_layer, the gate) named
        before Lightning's load fails with `size mismatch` (see `check_weights_fit`)."""
        config = self.config[self.subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).expanduser().is_file():
            return
        ckpt = read_checkpoint(ckpt_path)
        model = config.get("model")
        configured = model.init_args.as_dict() if model is not None and model.get("init_args") is not None else {}
        differences = {  # validate/test/predict build the checkpoint's model: only the data can differ
            k: v
            for k, v in changed_args(ckpt.get("hyper_parameters") or {}, configured).items()
            if k not in OPTIMIZER_ARGS and self.subcommand == "fit"
        }
        saved_tokenizer = (ckpt.get("datamodule_hyper_parameters") or {}).get("tokenizer")
        tokenizer = config.data.get("tokenizer") if config.get("data") is not None else None
        if saved_tokenizer is not None and tokenizer is not None and saved_tokenizer != tokenizer:
            differences = {"data.tokenizer": (saved_tokenizer, tokenizer), **differences}
        check_weights_fit(self.model, ckpt, ckpt_path, differences)

    def before_fit(self) -> None:
        peak = self.config[self.subcommand].get("peak_tflops")
        if peak is not None:
            for callback in self.trainer.callbacks:
                if isinstance(callback, TokenThroughput):
                    callback.peak_flops = peak * 1e12


def run_lightning_cli(args: list[str] | None = None) -> PonderCLI:
    return PonderCLI(
        CausalLMModule,
        PileDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        # The DataModule shards batches across ranks itself (sampling is a pure function of
        # seed, step and rank), so Lightning must not wrap its sampler.
        trainer_defaults={
            "use_distributed_sampler": False,
            "callbacks": [TokenThroughput(), DepthMonitor(), LabelMonitor(), FitSummary()],
        },
        parser_kwargs={"prog": PROG, "description": "Train and evaluate pondering language models (LightningCLI)."},
        args=args,
    )


def check_model_fits_data(model: CausalLMModule, data: PileDataModule | None) -> None:
    """What the model and the data must agree on, checked once both are built and before any
    document is tokenised (the model's own `setup` would only see it after tokenising)."""
    seq_len = getattr(data, "seq_len", None)
    if seq_len is not None:
        model.check_seq_len(seq_len)


def flops_command(argv: list[str]) -> None:
    """`flops --config ... [--active 1,0.9,0.8,0.7] [--context N]`: inference FLOPs per token of the
    configured model at full depth and, optionally, at given per-iteration active fractions."""
    from ponder_lightning.flops import format_flops_table

    parser = argparse.ArgumentParser(prog="python -m ponder_lightning flops", description=flops_command.__doc__)
    parser.add_argument(
        "--active",
        action="append",
        type=active_fractions,
        default=[],
        help="comma-separated active fraction per iteration, from 1 down, e.g. 1,0.9,0.7 (repeatable)",
    )
    parser.add_argument(
        "--context", type=bounded(int, 1), default=None, help="attention context in tokens (default: the data seq_len)"
    )
    own, rest = parser.parse_known_args(argv)
    cli = PonderCLI(
        CausalLMModule,
        PileDataModule,
        subclass_mode_model=True,
        run=False,
        args=rest,
        trainer_defaults={"use_distributed_sampler": False, "logger": False},
    )
    model = cli.model
    context = cli.datamodule.seq_len if own.context is None else own.context
    depths = [[1.0] * model.n_iterations, *own.active]
    for fractions in depths:
        if len(fractions) != model.n_iterations:
            raise UserError(
                f"--active {','.join(map(str, fractions))} has {len(fractions)} "
                f"fractions; {type(model).__name__} runs {model.n_iterations} iterations"
            )
    print(format_flops_table(type(model).__name__, context, [(f, model.realised_flops(f, context)) for f in depths]))


def generate_command(argv: list[str]) -> None:
    """`generate --checkpoint CKPT --prompt TEXT [...]`: adaptive-depth decoding; prints the
    continuation, the depth used for each generated token and the totals."""
    from ponder_lightning.data import load_tokenizer
    from ponder_lightning.generate import generate
    from ponder_lightning.io.load import load_checkpoint

    parser = argparse.ArgumentParser(prog="python -m ponder_lightning generate", description=generate_command.__doc__)
    parser.add_argument("--checkpoint", required=True, help="a .ckpt written by `fit`")
    parser.add_argument(
        "--prompt", action="append", required=True, type=non_empty_text, help="prompt text (repeat for a batch)"
    )
    parser.add_argument("--max_new_tokens", type=bounded(int, 1), default=64)
    parser.add_argument("--temperature", type=bounded(float, 0.0), default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=bounded(int, 1), default=None)
    parser.add_argument("--top_p", type=bounded(float, 0.0, 1.0, low_open=True), default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--tokenizer", default=None, help="default: the one the checkpoint was trained with")
    parser.add_argument(
        "--compile_attention",
        action="store_true",
        help="compile the attention of rows at different iterations (faster batched adaptive decoding; "
        "compiling takes seconds)",
    )
    add_trust_flag(parser)
    args = parser.parse_args(argv)
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise UserError(
            "--top_k/--top_p filter what is sampled, but --temperature 0 (the default) decodes greedily: "
            "set a --temperature above 0 (e.g. 0.8) or drop them"
        )
    model, data_args = load_checkpoint(args.checkpoint, trusted=args.trust_checkpoint)
    spec = args.tokenizer or data_args.get("tokenizer", "neox")
    tokenizer = load_tokenizer(spec)
    named = f"--tokenizer {spec}" if args.tokenizer else f"the checkpoint's tokenizer {spec}"
    check_tokenizer_fits(named, tokenizer.vocab_size, model.config.vocab_size)
    result = generate(
        model,
        args.prompt,
        tokenizer=tokenizer,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        compile_attention=args.compile_attention,
    )
    for prompt, text, tokens, depths in zip(args.prompt, result.texts, result.tokens, result.depths, strict=True):
        print(f"--- prompt: {prompt!r}\n{prompt}{text}")
        print(
            "depth per generated token: "
            + " ".join(f"{tokenizer.decode([t])!r}:{d}" for t, d in zip(tokens, depths, strict=True))
        )
    s = result.stats
    print(
        f"--- {s['generated_tokens']} tokens, {s['tokens_per_second']:.1f} tokens/s (prefill "
        f"{s['prefill_seconds']:.2f}s, decode {s['decode_seconds']:.2f}s in {s['decode_passes']} backbone passes), "
        f"mean depth {s['mean_depth']:.2f} of {model.n_iterations}, {s['flops_x_vanilla']:.2f}x vanilla FLOPs per token"
    )
    if result.interrupted:
        print("--- interrupted (Ctrl-C): the text above is what was generated before it")
        raise SystemExit(INTERRUPTED_EXIT_CODE)


def beside(checkpoint: str, what: str) -> Path:
    """Where a command writes what it made of `checkpoint` unless told: next to it, named after it
    (`checkpoints/last.ckpt` -> `checkpoints/last_evaluation`), never into the working directory."""
    path = Path(checkpoint.rstrip("/"))
    return path.with_name(f"{path.stem if path.suffix == '.ckpt' else path.name}_{what}")


def evaluate_command(argv: list[str], gate_study: Callable[..., dict[str, Any]] | None = None) -> None:
    """`evaluate --checkpoint CKPT [--data_files ...] [--tau 1e-4,1e-3,1e-2] [--reference VANILLA_CKPT] [--out DIR]`:
    validation loss/perplexity with mean depth, active fraction per iteration and FLOPs per token
    x vanilla; with --tau, a sweep over the halting threshold written as JSON + PNG. For a model
    whose gate halts tokens, always also the controls on the same weights: full depth (no
    halting), random pruning with the learned per-iteration profile, and depth per difficulty
    decile (difficulty = NLL at full depth, at the first pass, and under --reference). `gate_study`
    replaces those controls (`evaluate.gate_controls`) with a study that extends them (the research
    layer's, with its rankings and probes)."""
    from ponder_lightning.data.synthetic import is_synthetic
    from ponder_lightning.evaluate import (
        evaluate,
        format_gate_study,
        format_label_study,
        format_rows,
        gate_controls,
        halting_gate,
        label_study,
        write_curve,
        write_depth_figure,
    )
    from ponder_lightning.io.load import load_checkpoint

    parser = argparse.ArgumentParser(prog="python -m ponder_lightning evaluate", description=evaluate_command.__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument(
        "--data_files", default=None, help="evaluate on these files instead of the training run's validation split"
    )
    parser.add_argument(
        "--batches", type=bounded(int, 1), default=None, help="validation batches (default: the run's val_batches)"
    )
    parser.add_argument(
        "--tau", type=tau_list, default=None, help="comma-separated halting thresholds in [0, 1] to sweep"
    )
    parser.add_argument(
        "--reference",
        default=None,
        help="a one-pass (vanilla) checkpoint trained on the same data: its NLL is one more difficulty measure "
        "(for a model whose gate halts tokens)",
    )
    parser.add_argument(
        "--out",
        type=output_dir,
        default=None,
        help="directory for evaluation.json, gate_study.json and the figures (default: beside the checkpoint, "
        "<name>_evaluation, e.g. checkpoints/last_evaluation for checkpoints/last.ckpt; created and checked first)",
    )
    add_trust_flag(parser)
    args = parser.parse_args(argv)
    if args.out is None:  # not at parse time: a command line that fails to parse creates nothing
        try:
            args.out = output_dir(str(beside(args.checkpoint, "evaluation")))
        except argparse.ArgumentTypeError as err:
            parser.error(f"argument --out: {err}")
    model, data_args = load_checkpoint(args.checkpoint, trusted=args.trust_checkpoint)
    gate = model.gate
    halts = halting_gate(model) is not None
    if args.reference and not halts:
        raise UserError(
            f"--reference: {type(model).__name__} (gate {type(gate).__name__ if gate else 'none'}) never halts "
            "a token, so there is no depth to set against a difficulty and no gate study: drop --reference"
        )
    # read now, not after the evaluation
    reference = load_checkpoint(args.reference, trusted=args.trust_checkpoint)[0] if args.reference else None
    overrides: dict[str, Any] = {}
    if args.data_files:  # these files replace the run's data, whether text or pre-tokenised
        overrides.update(data_files=args.data_files, val_files=args.data_files, tokens=None)
    if args.batches:
        overrides["val_batches"] = args.batches
    data = PileDataModule.from_recorded(data_args, **overrides)
    try:
        data.setup("validate")
    except UserError as err:  # its advice names data.* settings, which evaluate takes from the checkpoint
        if not args.data_files or not any(f"data.{k}" in str(err) for k in ("seq_len", "batch_size")):
            raise
        raise UserError(
            f"--data_files {args.data_files} holds too little text: evaluate needs at least {data.batch_size} "
            f"blocks of {data.seq_len + 1} tokens (the checkpoint's data.batch_size and data.seq_len + 1): "
            "pass more text"
        ) from err
    taus = args.tau
    batches = list(data.val_dataloader())
    rows = evaluate(model, batches, data.seq_len, taus)
    print(f"{type(model).__name__} from {args.checkpoint}, {data.seq_len}-token blocks")
    print(format_rows(rows))
    json_path, png_path = write_curve(rows, args.out)
    print(f"wrote {json_path} and {png_path}")
    if is_synthetic(data.data_files):  # tokens labelled by the steps they take
        report = label_study(model, batches, data.seq_len)
        print("\nper label (data.synthetic), as trained and, on the same weights, at other depths:")
        print(format_label_study(report))
        (Path(args.out) / "labels.json").write_text(json.dumps(report, indent=2))
        print(f"wrote {Path(args.out) / 'labels.json'}")
    if not halts:
        return
    study = (gate_study or gate_controls)(model, batches, data.seq_len, reference=reference)
    print("\ncontrols on the same weights and data:")
    print(format_gate_study(study))
    (Path(args.out) / "gate_study.json").write_text(json.dumps(study, indent=2))
    print(
        f"wrote {Path(args.out) / 'gate_study.json'} and "
        f"{write_depth_figure(study['rows'][0], args.out, study['difficulty']['nll_full_depth']['deciles'])}"
    )


class _ParseOnlyCLI(PonderCLI):
    def instantiate_classes(self) -> None:
        """Nothing is built: `check_fit_args` only parses."""


def check_fit_args(argv: list[str]) -> None:
    """Parse `fit` arguments (`["fit", "--config", ...]`) as `fit` would, building nothing: a
    `UserError` naming the field for a bad one."""
    try:
        _ParseOnlyCLI(
            CausalLMModule,
            PileDataModule,
            subclass_mode_model=True,
            run=False,
            args=argv[1:] if argv[:1] == ["fit"] else argv,
            save_config_callback=None,
            trainer_defaults={"use_distributed_sampler": False},
        )
    except argparse.ArgumentError as err:
        raise UserError(parser_error_message(str(err), argv)) from None


def prepare_command(argv: list[str]) -> None:
    from ponder_lightning.data.prepare import prepare_command as run

    run(argv)


def export_command(argv: list[str]) -> None:
    """`export --checkpoint last.ckpt --out DIR [--format backbone|transformers]`: write a trained
    model as a Hugging Face directory. `backbone` (default): the backbone as a plain GPT-NeoX/LLaMA
    checkpoint plus ponder_lightning's files; `transformers`: the whole pondering model, loaded by
    `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` (needs ponder_lightning
    installed where it is loaded)."""
    from ponder_lightning.io import export_model, load_checkpoint
    from ponder_lightning.io.export import FORMATS, check_export_dir
    from ponder_lightning.io.formats import EXPORT_CONFIG

    parser = argparse.ArgumentParser(prog="python -m ponder_lightning export", description=export_command.__doc__)
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a .ckpt written by `fit` (file or FSDP directory), or an exported directory",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=output_dir,
        help="output directory (created; an earlier export's files in it are replaced, nobody else's)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files in --out that an export would write but did not (e.g. your own config.json)",
    )
    parser.add_argument(
        "--format",
        choices=tuple(FORMATS),
        default="backbone",
        help="backbone: plain GPT-NeoX/LLaMA backbone + ponder_lightning files; "
        "transformers: the whole model with remote code",
    )
    add_trust_flag(parser)
    args = parser.parse_args(argv)
    check_export_dir(args.out, args.overwrite)  # before the model is loaded
    model, data = load_checkpoint(args.checkpoint, trusted=args.trust_checkpoint)
    out = export_model(
        model, args.out, args.format, data.get("tokenizer"), data.get("global_step", 0), data, args.overwrite
    )
    if args.format == "transformers":
        note = "" if data.get("tokenizer") else " (no tokenizer recorded: add the tokenizer files yourself)"
        print(
            f"exported {type(model).__name__} at step {data.get('global_step', 0)} to {out} as a transformers model: "
            f"AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True){note}"
        )
        return
    kind = (
        "GPT-NeoX checkpoint"
        if not (out / EXPORT_CONFIG).exists()
        else f"{type(model).__name__} (backbone in Hugging Face layout + {EXPORT_CONFIG})"
    )
    print(f"exported {kind} at step {data.get('global_step', 0)} to {out}")


def lm_eval_command(argv: list[str]) -> None:
    """`lm_eval --checkpoint CKPT --tasks T1,T2 [...]`: lm-evaluation-harness tasks on a checkpoint
    (or an exported directory), with the compute next to the scores (`ponder_lightning.lm_eval_adapter`)."""
    try:
        from ponder_lightning.lm_eval_adapter import main as run
    except ImportError as exc:
        raise UserError(str(exc)) from None
    run(argv, prog="python -m ponder_lightning lm_eval")


def inspect_command(argv: list[str]) -> None:
    """`inspect --checkpoint CKPT (--text TEXT | --blocks N [--data_files ...] | --prompt TEXT
    --max_new_tokens N) [--format html|ansi] [--out page.html]`: where the model ponders. Every
    token coloured by the passes it ran; in the page, on click, its gate scores, what each pass
    would have predicted and the target's NLL after each; the summary with the full-depth
    counterfactual. For a synthetic task's blocks, each token's label and the per-label table."""
    import html

    from ponder_lightning.data import load_tokenizer
    from ponder_lightning.data.synthetic import is_synthetic, label_block
    from ponder_lightning.depth_map import pass_report, render_ansi, render_html, token_decoder
    from ponder_lightning.evaluate import format_label_study, label_study
    from ponder_lightning.generate import generate
    from ponder_lightning.io.load import load_checkpoint

    parser = argparse.ArgumentParser(prog="python -m ponder_lightning inspect", description=inspect_command.__doc__)
    parser.add_argument("--checkpoint", required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", type=non_empty_text, help="text to run teacher-forced")
    source.add_argument(
        "--blocks", type=bounded(int, 1), help="this many validation blocks of the run's data (or --data_files)"
    )
    source.add_argument("--prompt", type=non_empty_text, help="a prompt to continue; the page shows the continuation")
    parser.add_argument("--data_files", default=None, help="with --blocks: these files instead of the run's data")
    parser.add_argument("--max_new_tokens", type=bounded(int, 1), default=32, help="with --prompt")
    parser.add_argument("--format", choices=["html", "ansi"], default="html")
    parser.add_argument(
        "--out", type=output_file, default=None, help="the page (default: beside the checkpoint, <name>_depth_map.html)"
    )
    parser.add_argument("--top_k", type=bounded(int, 1), default=5, help="predictions shown per pass")
    add_trust_flag(parser)
    args = parser.parse_args(argv)
    if args.data_files and args.blocks is None:
        parser.error("argument --data_files: only with --blocks")
    if args.format == "html" and args.out is None:
        try:
            args.out = output_file(str(beside(args.checkpoint, "depth_map.html")))
        except argparse.ArgumentTypeError as err:
            parser.error(f"argument --out: {err}")
    model, data_args = load_checkpoint(args.checkpoint, trusted=args.trust_checkpoint)
    tokenizer = load_tokenizer(data_args.get("tokenizer", "neox"))
    check_tokenizer_fits(
        f"the checkpoint's tokenizer {data_args.get('tokenizer')}", tokenizer.vocab_size, model.config.vocab_size
    )
    extra, labelled = "", False
    if args.blocks is not None:
        overrides: dict[str, Any] = {"val_batches": 1}
        if args.data_files:
            overrides.update(data_files=args.data_files, val_files=args.data_files, tokens=None)
        data = PileDataModule.from_recorded(data_args, **overrides)
        data.setup("validate")
        batch = next(iter(data.val_dataloader()))
        rows = batch[: args.blocks]
        labelled = is_synthetic(data.data_files)
        reports = [
            pass_report(model, row[:-1], row[1:].tolist(), label_block(row.tolist())[1:] if labelled else None)
            for row in rows
        ]
        if labelled:
            table = format_label_study(label_study(model, [rows], data.seq_len))
            extra = "<h2>Per label (these blocks)</h2><pre>" + html.escape(table) + "</pre>"
        title = f"{type(model).__name__}: {len(reports)} validation block(s) of {data.seq_len + 1} tokens"
    elif args.text is not None:
        ids = tokenizer.encode(args.text)
        reports = [pass_report(model, ids)]
        title = f"{type(model).__name__} on the given text"
    else:
        result = generate(model, [args.prompt], tokenizer=tokenizer, max_new_tokens=args.max_new_tokens)
        ids = tokenizer.encode(args.prompt) + result.tokens[0]
        reports = [pass_report(model, ids)]
        title = f"{type(model).__name__}: the prompt and {len(result.tokens[0])} generated tokens (greedy)"
    decode = token_decoder(tokenizer)
    if args.format == "ansi":
        print(render_ansi(model, reports, decode))
        if labelled:
            print(table)
        return
    Path(args.out).write_text(render_html(model, reports, decode, title, top_k=args.top_k, extra_html=extra))
    print(f"wrote {args.out} ({sum(len(r.tokens) for r in reports)} tokens); open it in a browser")


PROG = "python -m ponder_lightning"
#: Exit status after Ctrl-C (128 + SIGINT, the shell's convention).
INTERRUPTED_EXIT_CODE = 130
#: LightningCLI's commands (`--config configs/<model>.yaml`), one line each for `--help`.
LIGHTNING_COMMANDS = {
    "fit": "train a model from a config, or resume a run with --ckpt_path last",
    "validate": "validation loss, perplexity and depth of a checkpoint (--ckpt_path)",
    "test": "Lightning's test loop (PileDataModule has no test split: use validate)",
    "predict": "Lightning's predict loop (the models define no predict_step: use generate)",
}
# Commands beyond LightningCLI's; each imports its module only when used.
COMMANDS = {
    "flops": flops_command,
    "generate": generate_command,
    "evaluate": evaluate_command,
    "inspect": inspect_command,
    "prepare": prepare_command,
    "export": export_command,
    "lm_eval": lm_eval_command,
}
DESCRIPTIONS = {
    **LIGHTNING_COMMANDS,
    "flops": "inference FLOPs per token of a configured model, at full depth and given active fractions",
    "generate": "adaptive-depth decoding from a checkpoint, with the depth of every token",
    "evaluate": "perplexity, depth and FLOPs of a checkpoint, a halting-threshold sweep, the gate controls",
    "inspect": "where a model ponders: tokens coloured by depth, each pass's predictions (HTML page or terminal)",
    "prepare": "tokenise text files once into shards that data.tokens reads",
    "export": "write a checkpoint as a Hugging Face directory",
    "lm_eval": "lm-evaluation-harness tasks on a checkpoint, with the compute next to the scores",
}


def overview(descriptions: dict[str, str] = DESCRIPTIONS) -> str:
    """`python -m ponder_lightning --help`: every command with one line (LightningCLI's own help
    would list only fit/validate/test/predict)."""
    width = max(map(len, descriptions))
    lines = [f"usage: {PROG} COMMAND [options]  ({PROG} COMMAND --help lists a command's options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in descriptions.items()]
    return "\n".join(lines)


def close_process_group() -> None:
    """Tear down a distributed run's process group before the interpreter exits: left to
    interpreter shutdown, gloo's threads can abort a finished rank ("terminate called without an
    active exception", exit code -6), which fails the job after a successful run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears its connections down while another still talks on them
        dist.destroy_process_group()


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (Lightning's record of the rank: it reads RANK,
    LOCAL_RANK and SLURM_PROCID, which is what the processes its launcher starts have)."""
    return getattr(rank_zero_only, "rank", 0) == 0


def main(
    args: list[str] | None = None,
    commands: dict[str, Callable[[list[str]], None]] = COMMANDS,
    descriptions: dict[str, str] = DESCRIPTIONS,
) -> None:
    """Run one command: LightningCLI's, or one of `commands` (the library's by default; the
    research layer's `research.cli.main` passes its own on top, as `python -m` does)."""
    argv = sys.argv[1:] if args is None else args
    if not argv or argv[0] in ("-h", "--help"):
        print(overview(descriptions))
        raise SystemExit(0 if argv else 2)
    try:
        if argv[0] not in descriptions and not argv[0].startswith("-"):
            raise UserError(
                f"unknown command {argv[0]!r}: use one of {', '.join(descriptions)} (--help describes them)"
            )
        if argv[0] in commands:
            commands[argv[0]](argv[1:])
        else:
            run_lightning_cli(args)  # None: LightningCLI reads sys.argv itself
        close_process_group()
    except SIGTERMException as stop:  # AtomicModelCheckpoint saved and said so; every rank stops here
        close_process_group()
        raise SystemExit(stop.code if isinstance(stop.code, int) else SIGTERM_EXIT_CODE) from None
    except KeyboardInterrupt:  # Ctrl-C outside fit (Lightning handles it there): no traceback
        print("interrupted", file=sys.stderr)
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
    except argparse.ArgumentError as err:  # from the config parser (exit_on_error=False)
        if is_rank_zero():
            print(f"error: {parser_error_message(str(err), argv)}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:
        cause = user_error_in(err)
        if cause is None:
            raise
        if is_rank_zero():  # every rank raises it; one line is enough
            print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
