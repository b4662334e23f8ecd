"""`study`: an ablation as a file. Trains every run of a study through the same `fit` path,
evaluates all of them on the same validation blocks with the controls of `research.gate_study`,
and writes a markdown table (mean and spread over seeds), a figure and one TensorBoard tree.

A study file (YAML)::

    out: studies/out/small            # everything goes here; TensorBoard: tensorboard --logdir <out>/runs
    seeds: [1, 2]                     # every run is trained once per seed
    base: [studies/small_base.yaml]   # overlays every run gets after its own configs
                                      # (paths: the working directory's, else the repository's)
    args: [--trainer.max_steps, "400"]  # flags every run gets
    reference: vanilla                # the run whose per-token NLL is a difficulty measure (same seed)
    frontier: [vanilla, ponderlm]     # fixed-depth runs; every halting run is compared with them at its FLOPs
    eval_batches: 16                  # validation batches every run is evaluated on
    runs:
      vanilla: {configs: [configs/vanilla.yaml]}
      adaponderlm: {configs: [configs/adaponderlm.yaml], args: [...]}
      fixed_geometric:                # a control matched to another run's result, same seed:
        configs: [configs/adaponderlm.yaml, configs/gates/fixed_geometric.yaml]
        args: [--model.init_args.gate.init_args.target_depth, "{adaponderlm:depth_mean}"]

A run may list its own `seeds:` (a subset of the study's, e.g. one seed for a costly ablation).
`{run:depth_mean}` is that run's mean depth at evaluation (same seed), `{run:pondering_steps}`
the extra passes of the deepest fixed-depth PonderLM whose depth does not exceed that mean (at
most the same FLOPs: with PonderLM at full depth it brackets the adaptive model) and
`{run:export}` its final checkpoint exported as a Hugging Face directory (a start for continued
pretraining: `--model.init_args.pretrained {vanilla:export}`); a run that refers to another is
trained after it. Finished runs are skipped and an interrupted one
resumes from its last checkpoint, so the same command continues a stopped study.

The study sits below the command line (tests/test_layering.py): it does not import
`ponder_lightning.cli` but is handed its `fit` entry (`fit(argv)`, the `run_lightning_cli` of
`python -m ponder_lightning study`), which it calls with each run's `fit ...` arguments.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ponder_lightning import flops
from ponder_lightning.errors import UserError, user_error_in
from ponder_lightning.validation import check_writable_dir

#: Every run's validations log depth against difficulty (`callbacks.DifficultyMonitor`, opt-in
#: in the library: two extra forwards per validation batch).
DIFFICULTY_MONITOR = "--trainer.callbacks+=ponder_lightning.callbacks.DifficultyMonitor"
ROOT = Path(__file__).resolve().parents[2]  # the repository: configs/ and studies/ resolve from it
#: `{run:field}` in a run's args: another run's result of the same seed (any run name, dots included)
REFERENCE = re.compile(r"\{([^{}:\s]+):(depth_mean|pondering_steps|export)\}")
#: anything shaped like a reference, to reject one that REFERENCE would silently leave as text
LOOKS_LIKE_REFERENCE = re.compile(r"\{[^{}\s]*:[^{}\s]*\}")
SUMMARY_FIELDS = [
    "ppl",
    "flops_x_vanilla",
    "train_flops_x_vanilla",
    "train_compute_x_reference",
    "depth_mean",
    "ppl_full_depth",
    "ppl_random_pruning",
    "spearman_nll_full_depth",
    "spearman_nll_first_pass",
    "spearman_nll_reference",
    "spearman_entropy_first_pass",
    "spearman_pondering_gain",
    "train_minutes",
]


#: What each field of a study (and of a run) holds: a check and how to say it.
STUDY_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "out": (lambda v: isinstance(v, str), "a directory"),
    "seeds": (lambda v: isinstance(v, list) and v and all(type(s) is int and s >= 0 for s in v), "a list of seeds"),
    "base": (lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v), "a list of config files"),
    "args": (lambda v: isinstance(v, list), "a list of flags and values"),
    "reference": (lambda v: v is None or isinstance(v, str), "a run name"),
    "frontier": (lambda v: isinstance(v, list), "a list of run names"),
    "eval_batches": (lambda v: type(v) is int and v > 0, "a positive number of batches"),
    "compare": (
        lambda v: isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 for p in v),
        "a list of [run, other run] pairs",
    ),
}
RUN_TYPES = {"configs": STUDY_TYPES["base"], "args": STUDY_TYPES["args"], "seeds": STUDY_TYPES["seeds"]}


def check_types(path: Path, fields: dict[str, Any], types: dict[str, tuple[Callable[[Any], bool], str]], where: str):
    for field, value in fields.items():
        ok, expected = types.get(field, (lambda v: True, ""))
        if not ok(value):
            raise UserError(f"{path}: {where}{field} must be {expected}, got {value!r} (YAML lists: [a, b])")


def load_study(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"study file {path} does not exist")
    try:
        study = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(study, dict) or not isinstance(study.get("runs"), dict) or not study["runs"]:
        raise UserError(f"{path}: a study needs `runs:` (a mapping of run names to their configs and args)")
    unknown = set(study) - {"out", "seeds", "base", "args", "reference", "frontier", "eval_batches", "compare", "runs"}
    if unknown:
        raise UserError(f"{path}: unknown study field(s) {sorted(unknown)}")
    study.setdefault("seeds", [1])
    study.setdefault("eval_batches", 16)
    check_types(path, study, STUDY_TYPES, "")
    for name, run in study["runs"].items():
        run = run or {}
        check_types(path, run, RUN_TYPES, f"run {name}: ")
        unknown = set(run) - {"configs", "args", "seeds"}
        if unknown:
            raise UserError(f"{path}: run {name} has unknown field(s) {sorted(unknown)} (configs, args, seeds)")
        if not set(run.get("seeds", [])) <= set(study["seeds"]):
            raise UserError(
                f"{path}: run {name}'s seeds {run['seeds']} are not among the study's seeds {study['seeds']}"
            )
        args = " ".join(map(str, run.get("args", [])))
        for candidate in LOOKS_LIKE_REFERENCE.findall(args):
            if not REFERENCE.fullmatch(candidate):
                raise UserError(
                    f"{path}: run {name} has {candidate} in its args: a reference is {{run:depth_mean}}, "
                    "{run:pondering_steps} or {run:export}"
                )
        for ref, _ in REFERENCE.findall(args):
            if ref not in study["runs"]:
                raise UserError(f"{path}: run {name} refers to {{{ref}:...}}, which is not a run of this study")
            if not set(run.get("seeds", study["seeds"])) <= set(
                (study["runs"][ref] or {}).get("seeds", study["seeds"])
            ):
                raise UserError(f"{path}: run {name} refers to {ref}, which is not trained for all of {name}'s seeds")
    if study.get("reference") is not None and study["reference"] not in study["runs"]:
        raise UserError(f"{path}: reference {study['reference']!r} is not a run of this study")
    for field, names in (("frontier", study.get("frontier", [])), ("compare", sum(study.get("compare", []), []))):
        strangers = [name for name in names if name not in study["runs"]]
        if strangers:
            raise UserError(f"{path}: {field} run(s) {strangers} are not runs of this study")
    study.setdefault("out", str(Path("studies/out") / path.stem))
    return study


def run_order(runs: dict[str, Any], reference: str | None) -> list[str]:
    """Runs in an order where every run comes after the runs it refers to (and the reference first)."""
    done: list[str] = [reference] if reference else []
    pending = [name for name in runs if name not in done]
    while pending:
        ready = [
            n
            for n in pending
            if all(r in done for r, _ in REFERENCE.findall(" ".join(map(str, (runs[n] or {}).get("args", [])))))
        ]
        if not ready:
            raise UserError(f"runs {pending} refer to each other in a cycle")
        done += ready
        pending = [n for n in pending if n not in ready]
    return done


def resolve(arg: str, results: dict[str, dict[str, Any]]) -> str:
    def value(match: re.Match[str]) -> str:
        result = results[match.group(1)]
        if "depth_mean" not in result:
            raise UserError(f"run {match.group(1)} failed, so {arg} has no value")
        if match.group(2) == "export":
            return str(export_once(Path(result["checkpoint"])))
        return (
            f"{result['depth_mean']:.4f}"
            if match.group(2) == "depth_mean"
            else str(max(math.floor(result["depth_mean"] + 1e-9) - 1, 0))
        )

    return REFERENCE.sub(value, str(arg))


Fit = Callable[[list[str]], Any]
"""The command line's `fit` entry: `fit(["fit", "--config", ...])` trains one run."""


def check_runs(study: dict[str, Any], check: Fit) -> None:
    """Every run's configs exist and its `fit` arguments parse (`check` parses without building),
    before the first run trains: a broken run is found in seconds, not after the others trained.
    References to other runs' results stand in as placeholders of the same kind."""

    def placeholder(match: re.Match[str]) -> str:
        if match.group(2) == "export":
            return str(Path(study["out"]) / "runs" / match.group(1) / "export")
        return "1"

    for name, run in study["runs"].items():
        for config in [*(run or {}).get("configs", []), *study.get("base", [])]:
            if not config_path(config).exists():
                raise UserError(f"run {name}: config file {config} does not exist (nor under {ROOT})")
        argv = fit_argv(study, name, study["seeds"][0], Path(study["out"]) / "runs" / name, {}, placeholder)
        try:
            check(argv)
        except Exception as err:  # noqa: BLE001 - the parser's and the configs' errors alike
            cause = user_error_in(err)
            if cause is None:
                raise
            raise UserError(f"run {name}: {cause}") from None


def config_path(config: str) -> Path:
    """A run's config file: relative to the working directory, else to the repository."""
    return Path(config) if Path(config).exists() else ROOT / config


def fit_argv(
    study: dict[str, Any],
    name: str,
    seed: int,
    run_dir: Path,
    results: dict[str, dict[str, Any]],
    placeholder: Callable[[re.Match[str]], str] | None = None,
) -> list[str]:
    """The `fit` arguments that define a run: its own configs first (they choose the model
    class), the study's base after, then the study's and the run's args with references resolved
    (or, with `placeholder`, replaced by what it returns for each)."""
    run = study["runs"][name] or {}
    configs = [*run.get("configs", []), *study.get("base", [])]
    argv = ["fit"]
    for config in configs:
        argv += ["--config", str(config_path(config))]
    args = [*study.get("args", []), *run.get("args", [])]
    argv += [REFERENCE.sub(placeholder, str(a)) if placeholder else resolve(a, results) for a in args]
    argv += [
        DIFFICULTY_MONITOR,
        "--seed_everything",
        str(seed),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.logger.class_path",
        "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir",
        str(run_dir.parent.parent),
        "--trainer.logger.init_args.name",
        name,
        "--trainer.logger.init_args.version",
        f"seed_{seed}",
    ]
    return argv


def definition(argv: list[str]) -> list[str]:
    """A run's `fit` arguments as far as they define it: config paths absolute (a study run from
    another directory is the same study), no `--ckpt_path` (a resumed run is the same run) and
    no `DIFFICULTY_MONITOR` (it only logs: a run trained before studies added it is the same)."""
    kept, i = [], 0
    while i < len(argv):
        flag = argv[i]
        if flag in ("--ckpt_path", "--config") and i + 1 < len(argv):
            if flag == "--config":
                kept += [flag, str(Path(argv[i + 1]).resolve())]
            i += 2
            continue
        if flag != DIFFICULTY_MONITOR:
            kept.append(flag)
        i += 1
    return kept


def recorded_argv(run_dir: Path) -> list[str] | None:
    """The `fit` arguments the run was last trained with (`command.txt`), if it records them."""
    command = run_dir / "command.txt"
    if not command.is_file():
        return None
    return command.read_text().split()[len(("python", "-m", "ponder_lightning")) :]


def check_unchanged(study: dict[str, Any], name: str, seed: int, run_dir: Path, results: dict[str, Any]) -> None:
    """A finished run whose study entry changed since it trained would report the old run under
    the new definition: refuse, saying what differs and how to train it again."""
    trained = recorded_argv(run_dir)
    try:
        now = fit_argv(study, name, seed, run_dir, results)
    except UserError:  # a run it refers to failed: nothing to compare with
        return
    if trained is None or definition(trained) == definition(now):
        return
    old, new = definition(trained), definition(now)
    gone = [a for a in old if a not in new]
    added = [a for a in new if a not in old]
    raise UserError(
        f"run {name} seed {seed} was trained with other arguments than the study now gives it "
        f"(then: {' '.join(gone) or 'the same, in another order'}; now: {' '.join(added) or '-'}): delete {run_dir} "
        "to train it again, or restore the study file"
    )


def train(
    study: dict[str, Any], name: str, seed: int, run_dir: Path, results: dict[str, dict[str, Any]], fit: Fit
) -> float:
    """Fit one run with `fit` (resuming its last checkpoint if it was interrupted); returns the
    minutes this call spent (a resumed run: since its resume)."""
    argv = fit_argv(study, name, seed, run_dir, results)
    resume_from = last_checkpoint(run_dir)
    if resume_from is not None:
        argv += ["--ckpt_path", str(resume_from)]
    (run_dir / "command.txt").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "command.txt").write_text("python -m ponder_lightning " + " ".join(argv) + "\n")
    start = time.perf_counter()
    try:
        fit(argv)
    except Exception as err:
        cause = user_error_in(err)
        if cause is None:
            raise
        raise cause from None
    return (time.perf_counter() - start) / 60


def export_once(checkpoint: Path) -> Path:
    """The run's checkpoint as a Hugging Face directory next to its checkpoints (written once)."""
    from ponder_lightning.io.export import export_hf
    from ponder_lightning.io.load import load_checkpoint

    out = checkpoint.parent.parent / "export"
    if not (out / "config.json").is_file():
        model, data = load_checkpoint(checkpoint)
        export_hf(model, out, global_step=data["global_step"])
    return out


def last_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(run_dir.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def evaluate_run(
    model, data: dict[str, Any], batches: list[Any], context: int, reference_checkpoint: Path | None
) -> dict[str, Any]:
    """One run's results: `model` and its recorded `data` settings as `load_checkpoint` gives them."""
    from ponder_lightning.data.synthetic import is_synthetic
    from ponder_lightning.evaluate import halting_gate, label_study, summarise, token_nll
    from ponder_lightning.io.load import load_checkpoint
    from ponder_lightning.research.gate_study import gate_study

    result: dict[str, Any] = {
        "model": type(model).__name__,
        "gate": type(model.gate).__name__,
        "train_flops_x_vanilla": model.training_flops_x_vanilla(context, data["global_step"]),
        # the unit of this run's x-vanilla figures: one forward of its own backbone (see `in_study_unit`)
        "vanilla_flops_per_token": flops.vanilla_forward_flops(model.config, context),
        "train_tokens": data["global_step"] * data["batch_size"] * data["seq_len"],
    }
    if is_synthetic(data.get("data_files")):  # tokens labelled by the steps they take
        result["labels"] = label_study(model, batches, context)
    if halting_gate(model) is None:
        return result | summarise(model, *token_nll(model, batches), context)
    reference = load_checkpoint(reference_checkpoint)[0] if reference_checkpoint else None
    study = gate_study(model, batches, context, reference=reference)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for row in study["rows"]:
        by_kind.setdefault(row["kind"], []).append(row)
    result |= by_kind["learned"][0] | {"controls": study["rows"], "difficulty": study["difficulty"]}
    for kind, rows in by_kind.items():
        if kind != "learned":  # ppl_full_depth, ppl_random_pruning (mean over its seeds), ppl_oracle_gain, ...
            result[f"ppl_{kind}"] = sum(r["ppl"] for r in rows) / len(rows)
    for measure, report in study["difficulty"].items():
        result[f"spearman_{measure}"] = report["spearman"]
    return result


#: The data settings that decide which validation blocks a run is scored on.
VALIDATION_DATA = ("data_files", "val_files", "tokens", "tokenizer", "seq_len", "batch_size", "val_fraction")


def validation_batches(data_args: dict[str, Any], n_batches: int) -> tuple[list[Any], int, dict[str, Any]]:
    """A run's validation blocks, read with its recorded data settings, and those of its settings
    that decide the blocks (`run_study` checks that every run of a study has the same)."""
    from ponder_lightning.data import PileDataModule

    data = PileDataModule.from_recorded(data_args, val_batches=n_batches)
    data.setup("validate")
    return list(data.val_dataloader()), data.seq_len, {k: data_args.get(k) for k in VALIDATION_DATA}


def first_blocks(
    blocks: tuple[str, dict[str, Any]] | None, name: str, settings: dict[str, Any] | None
) -> tuple[str, dict[str, Any]] | None:
    """The study's first run with known validation settings, and those settings."""
    return blocks or ((name, settings) if settings is not None else None)


def other_blocks(first: tuple[str, dict[str, Any]] | None, settings: dict[str, Any] | None) -> str | None:
    """Why a run whose validation settings are `settings` is not scored on the same blocks as the
    study's first run (`first`: its name and settings), or None (also when either is unknown: a
    result written before the settings were recorded)."""
    if first is None or settings is None or settings == first[1]:
        return None
    name, expected = first
    differ = ", ".join(f"data.{k}={settings.get(k)!r} (not {v!r})" for k, v in expected.items() if settings.get(k) != v)
    return (
        f"its validation blocks differ from {name}'s ({differ}): a study scores every run on the same blocks; "
        "drop these data arguments from the run, or give it a study of its own"
    )


def run_study(path: str | Path, fit: Fit, reevaluate: bool = False, check: Fit | None = None) -> Path:
    """Train and evaluate the runs not finished yet; `reevaluate`: also evaluate the finished runs
    again from their last checkpoints, without training them again (after the evaluation gained a
    control). `check(argv)`: parses a run's `fit` arguments without building it (`check_runs`)."""
    from ponder_lightning.io.load import load_checkpoint

    study = load_study(path)
    out = Path(study["out"])
    try:
        check_writable_dir(out)
    except ValueError as err:
        raise UserError(f"{path}: out: {err}") from None
    if check is not None:
        check_runs(study, check)
    results: dict[int, dict[str, dict[str, Any]]] = {}
    blocks: tuple[str, dict[str, Any]] | None = None  # the first run with known validation settings, and those
    for seed in study["seeds"]:
        results[seed] = {}
        for name in run_order(study["runs"], study.get("reference")):
            if seed not in (study["runs"][name] or {}).get("seeds", study["seeds"]):
                continue
            run_dir = out / "runs" / name / f"seed_{seed}"
            done = run_dir / "result.json"
            if done.is_file():
                check_unchanged(study, name, seed, run_dir, results[seed])
            if done.is_file() and not reevaluate:
                result = json.loads(done.read_text())
                blocks = first_blocks(blocks, name, result.get("validation_data"))
                problem = other_blocks(blocks, result.get("validation_data"))
                results[seed][name] = {"error": problem} if problem else result
                print(f"[study] {name} seed {seed}: done earlier, skipped")
                continue
            if done.is_file():
                minutes = json.loads(done.read_text())["train_minutes"]
                print(f"[study] {name} seed {seed}: trained earlier, evaluating again")
            else:
                print(f"[study] {name} seed {seed}: training")
                try:
                    minutes = train(study, name, seed, run_dir, results[seed], fit)
                except UserError as err:  # e.g. a control that cannot reach the learned depth: say so, go on
                    print(f"[study] {name} seed {seed}: failed: {err}")
                    results[seed][name] = {"error": str(err)}
                    continue
            checkpoint = last_checkpoint(run_dir)
            if checkpoint is None:
                raise UserError(
                    f"run {name} seed {seed} wrote no checkpoints/last.ckpt under {run_dir}: a study evaluates the "
                    "last checkpoint, so keep the configs' AtomicModelCheckpoint (save_last: true)"
                )
            model, data_args = load_checkpoint(checkpoint)  # once: its data settings give the blocks
            batches, context, settings = validation_batches(data_args, study["eval_batches"])
            blocks = first_blocks(blocks, name, settings)
            if problem := other_blocks(blocks, settings):
                print(f"[study] {name} seed {seed}: not evaluated: {problem}")
                results[seed][name] = {"error": problem}
                continue
            reference = study.get("reference")
            reference_checkpoint = (
                last_checkpoint(out / "runs" / reference / f"seed_{seed}") if reference and reference != name else None
            )
            result = evaluate_run(model, data_args, batches, context, reference_checkpoint) | {
                "train_minutes": minutes,
                "seed": seed,
                "checkpoint": str(checkpoint),
                "validation_data": settings,
            }
            done.write_text(json.dumps(result, indent=2))
            results[seed][name] = result
    in_study_unit(study, results)
    tables = [summary_table(study, results), label_table(study, results), label_differences(study, results)]
    table = "\n\n".join([*filter(None, tables), frontier_table(study, results), allocation_table(study, results)])
    (out / "summary.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))
    write_figure(study, results, out / "ppl_vs_flops.png")
    print(table)
    print(
        f"[study] wrote {out / 'summary.md'}, {out / 'results.json'}, {out / 'ppl_vs_flops.png'}; "
        f"TensorBoard, every run side by side: tensorboard --logdir {out / 'runs'}"
    )
    return out


#: The FLOPs figures a study compares across runs.
STUDY_FLOPS = ("flops_x_vanilla", "train_flops_x_vanilla")


def in_study_unit(study: dict[str, Any], results: dict[int, dict[str, dict[str, Any]]]) -> None:
    """Put every run's FLOPs per token in one unit: one forward of the reference run's model (of
    the same seed), else of the smallest model. A run's own figures count forwards of its own
    backbone, so a vanilla model with 3x the layers would otherwise read 1.0x, like the small one.
    With a reference, also each run's whole training compute (FLOPs per token x tokens) as a
    multiple of the reference run's (`train_compute_x_reference`): a run trained longer costs
    more at the same FLOPs per token."""
    for runs in results.values():
        units = {name: r["vanilla_flops_per_token"] for name, r in runs.items() if "vanilla_flops_per_token" in r}
        if not units:
            continue
        unit = units.get(study.get("reference"), min(units.values()))
        for name, own in units.items():
            for field in STUDY_FLOPS:
                if runs[name].get(field) is not None:
                    runs[name][field] *= own / unit
        reference = runs.get(study.get("reference"), {})
        if "train_tokens" not in reference:
            continue
        reference_compute = reference["train_flops_x_vanilla"] * reference["train_tokens"]
        for result in runs.values():
            if "train_tokens" in result:
                result["train_compute_x_reference"] = (
                    result["train_flops_x_vanilla"] * result["train_tokens"] / reference_compute
                )


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one seed)."""
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, spread


def mean_and_spread(values: list[float]) -> str:
    """`mean ± standard deviation` over seeds, the mean alone for one seed, '' for none."""
    if not values:
        return ""
    mean, spread = mean_spread(values)
    return f"{mean:.3f} ± {spread:.3f}" if len(values) > 1 else f"{mean:.3f}"


def label_reports(results: dict[int, dict[str, dict[str, Any]]], run: str, variant: str) -> dict[int, dict[str, Any]]:
    """The `evaluate.label_study` report of `run` run as `variant`, per seed that has it."""
    return {
        s: runs[run]["labels"][variant] for s, runs in results.items() if variant in runs.get(run, {}).get("labels", {})
    }


def summary_table(study: dict[str, Any], results: dict[int, dict[str, dict[str, Any]]]) -> str:
    seeds = list(results)
    header = "| run | model / gate | " + " | ".join(SUMMARY_FIELDS) + " |"
    unit = f"the {study['reference']} run's model" if study.get("reference") else "the smallest model"
    lines = [
        f"Mean ± standard deviation over seeds {seeds} (one value: one seed). FLOPs per token in forwards of {unit}.",
        "",
        header,
        "|---|---|" + "---|" * len(SUMMARY_FIELDS),
    ]
    #: the seeds each run's means are over: those it finished
    finished = {
        name: [s for s in seeds if "error" not in results[s].get(name, {"error": ""})] for name in study["runs"]
    }
    for name in study["runs"]:
        rows = [results[s][name] for s in finished[name]]
        errors = {results[s][name]["error"] for s in seeds if "error" in results[s].get(name, {})}
        if errors:
            lines.append(f"| {name} | failed: {'; '.join(sorted(errors))} |" + " |" * len(SUMMARY_FIELDS))
        if not rows:
            continue
        cells = []
        for field in SUMMARY_FIELDS:
            values = [
                r[field]
                for r in rows
                if r.get(field) is not None and not (isinstance(r[field], float) and math.isnan(r[field]))
            ]
            if not values:
                cells.append("")
                continue
            cells.append(mean_and_spread(values))
        lines.append(f"| {name} | {rows[0]['model']} / {rows[0]['gate']} | " + " | ".join(cells) + " |")
    if len({tuple(v) for v in finished.values() if v}) > 1:
        # A seed that is harder for every model moves the means of the runs that have it: means
        # over different seeds are not a comparison.
        lines[1:1] = [
            "",
            "Runs average different seeds ("
            + "; ".join(f"{name}: {v}" for name, v in finished.items() if v)
            + "): compare those runs seed by seed (results.json, the frontier table), not by these means.",
        ]
    return "\n".join(lines)


def frontier_points(study: dict[str, Any], runs: dict[str, dict[str, Any]]) -> list[tuple[float, float]]:
    """(FLOPs, ppl) of the study's `frontier:` runs that finished, for one seed's `runs`, sorted."""
    return sorted(
        (runs[f]["flops_x_vanilla"], runs[f]["ppl"]) for f in study.get("frontier") or [] if "ppl" in runs.get(f, {})
    )


def undominated(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The sorted (FLOPs, ppl) points that no point with fewer FLOPs beats."""
    return [p for i, p in enumerate(points) if all(q[1] > p[1] for q in points[:i])]


def frontier_ppl(points: list[tuple[float, float]], budget: float) -> tuple[float, float, float] | None:
    """The best perplexity fixed depth reaches with at most `budget` FLOPs, and the FLOPs of the two
    fixed-depth runs it comes from: `points` are (FLOPs, ppl) of fixed-depth runs. Runs that
    another beats with no more FLOPs are dropped (a fixed-depth user would not pick them, so
    interpolating towards them would flatter the compared run); between the remaining ones the
    loss (log ppl) is interpolated linearly in FLOPs, and past the last one the frontier stays at
    its perplexity. None outside the runs' FLOPs range: a frontier is not extrapolated.

    Loss falls ever more slowly with compute, so a straight line between distant runs lies above
    the runs one could train in between: a wide bracket flatters whatever is compared inside it.
    The bracket is returned so that the table can show it."""
    points = sorted(points)
    if len(points) < 2 or not points[0][0] <= budget <= points[-1][0]:
        return None
    pareto = undominated(points)
    for (x0, y0), (x1, y1) in zip(pareto, pareto[1:], strict=False):
        if x0 <= budget <= x1:
            t = (budget - x0) / (x1 - x0)
            return math.exp((1 - t) * math.log(y0) + t * math.log(y1)), x0, x1
    return pareto[-1][1], pareto[-1][0], pareto[-1][0]


def frontier_table(study: dict[str, Any], results: dict[int, dict[str, dict[str, Any]]]) -> str:
    """Every run that halts tokens against the study's fixed-depth `frontier:` runs of the same seed,
    at its own FLOPs (`frontier_ppl`): is learned depth better than spending the same compute on
    every token? (The fixed-depth run at the learned mean depth alone is not a match: it has fewer
    FLOPs.)"""
    frontier = study.get("frontier") or []
    if len(frontier) < 2:
        return "No fixed-depth frontier (a study's `frontier:` lists at least two fixed-depth runs)."
    lines = [
        f"Against fixed depth at the same FLOPs (frontier: {', '.join(frontier)}; log-ppl interpolated "
        "linearly in FLOPs between the frontier runs that bracket each run, leaving out any run that "
        "another beats at no more FLOPs; negative: better than fixed depth). A wide bracket flatters the "
        "run inside it (returns diminish with compute): add fixed-depth runs near it.",
        "",
        "| run | seed | flops_x_vanilla | ppl | fixed-depth ppl at these FLOPs | bracket (FLOPs) | difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in study["runs"]:
        if name in frontier:
            continue
        differences = []
        for seed, runs in results.items():
            row = runs.get(name, {})
            if "ppl_full_depth" not in row:  # only runs whose gate halts tokens
                continue
            fixed = frontier_ppl(frontier_points(study, runs), row["flops_x_vanilla"])
            cells = f"| {name} | {seed} | {row['flops_x_vanilla']:.3f} | {row['ppl']:.3f} |"
            if fixed is None:
                lines.append(cells + " outside the frontier's FLOPs | | |")
                continue
            ppl, lower, upper = fixed
            differences.append(row["ppl"] / ppl - 1)
            lines.append(cells + f" {ppl:.3f} | {lower:.2f}-{upper:.2f} | {differences[-1]:+.2%} |")
        if len(differences) > 1:
            mean, spread = mean_spread(differences)
            lines.append(f"| {name} | mean | | | | | {mean:+.2%} ± {spread:.2%} |")
    return "\n".join(lines)


#: (result field, column) of `allocation_table`: other choices of the tokens that go on
ALLOCATIONS = [
    ("ppl", "its own gate"),
    ("ppl_entropy_least_sure", "least sure after pass 1 (entropy)"),
    ("ppl_entropy_surest", "surest after pass 1"),
    ("ppl_oracle_hardest", "oracle: hardest (NLL at full depth)"),
    ("ppl_probe_gain", "linear probe of the gain (cross-fitted)"),
    ("ppl_oracle_gain", "oracle: most helped by pondering"),
]


def allocation_table(study: dict[str, Any], results: dict[int, dict[str, dict[str, Any]]]) -> str:
    """Every run that halts tokens, on its own weights at its learned per-iteration profile, with
    other choices of which tokens go on (`research.gate_study`), against random pruning at that
    profile: does the gate pick the right tokens, would following difficulty pay, and how much
    would the best possible choice gain (the oracles read the targets: bounds, not gates)."""
    lines = [
        "Which tokens go on, on each run's own weights at its learned per-iteration profile: perplexity "
        "relative to random pruning at that profile (negative: a better choice of tokens than random). "
        "The oracles read the targets: they bound what any choice could gain, they are not gates.",
        "",
        "| run | seed | random pruning ppl | " + " | ".join(column for _, column in ALLOCATIONS) + " |",
        "|---|---|---|" + "---|" * len(ALLOCATIONS),
    ]
    for name in study["runs"]:
        relative: dict[str, list[float]] = {field: [] for field, _ in ALLOCATIONS}
        for seed, runs in results.items():
            row = runs.get(name, {})
            if "ppl_oracle_gain" not in row or min(row["active_fractions"]) == 1:  # runs whose gate halted tokens
                continue
            cells = []
            for field, _ in ALLOCATIONS:
                if field not in row:  # the probe needs two validation batches
                    cells.append("")
                    continue
                relative[field].append(row[field] / row["ppl_random_pruning"] - 1)
                cells.append(f"{row[field]:.3f} ({relative[field][-1]:+.2%})")
            lines.append(f"| {name} | {seed} | {row['ppl_random_pruning']:.3f} | " + " | ".join(cells) + " |")
        if len(relative["ppl"]) > 1:
            means = [mean_spread(values) if values else None for values in relative.values()]
            lines.append(
                f"| {name} | mean | | " + " | ".join(f"{m[0]:+.2%} ± {m[1]:.2%}" if m else "" for m in means) + " |"
            )
    return "\n".join(lines)


#: How `label_table` names the ways `evaluate.label_study` ran each model.
LABEL_VARIANTS = {
    "as_trained": "as trained",
    "full_depth": "full depth",
    "oracle_depth": "oracle depth",
    "readout_at_need": "full depth, read at the needed pass",
}


def label_table(study: dict[str, Any], results: dict[int, dict[str, dict[str, Any]]]) -> str:
    """On a synthetic task (`data.synthetic`): accuracy per label of every run, as trained and,
    on the same weights, at full depth and at the oracle's depth (each token halts after the
    steps its label needs), with the mean depth, FLOPs per token and AUROC of depth for k >= 2
    vs k = 1 tokens; mean ± standard deviation over the seeds each run finished. Empty for
    other data."""
    variants = [
        (name, variant) for name in study["runs"] for variant in LABEL_VARIANTS if label_reports(results, name, variant)
    ]
    if not variants:
        return ""
    labels = list(next(iter(label_reports(results, variants[0][0], "as_trained").values()))["labels"])
    lines = [
        "Per label of the synthetic task: accuracy (argmax = target) as trained and, on the same weights, at "
        "full depth and at the oracle's depth (each token halts after the steps its label needs); mean ± "
        "standard deviation over seeds. FLOPs per token in forwards of each run's own backbone.",
        "",
        "| run | depth | "
        + " | ".join(labels)
        + " | mean depth | FLOPs x vanilla | AUROC depth k>=2 vs k=1 | AUROC first score k>=2 vs k=1 |",
        "|---|---|" + "---|" * (len(labels) + 4),
    ]

    cell = mean_and_spread
    for name, variant in variants:
        reports = list(label_reports(results, name, variant).values())
        accuracy = [cell([r["labels"][label]["accuracy"] for r in reports if label in r["labels"]]) for label in labels]
        aurocs = [r["auroc_depth_multi_step"] for r in reports if r["auroc_depth_multi_step"] is not None]
        first_scores = [
            r["auroc_score_multi_step"][0]
            for r in reports
            if (r.get("auroc_score_multi_step") or [None])[0] is not None
        ]
        lines.append(
            f"| {name} | {LABEL_VARIANTS[variant]} | "
            + " | ".join(accuracy)
            + f" | {cell([r['depth_mean'] for r in reports])} | {cell([r['flops_x_vanilla'] for r in reports])} "
            + f"| {cell(aurocs)} | {cell(first_scores)} |"
        )
    return "\n".join(lines)


def label_pairs(study: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(title, run a, variant a, run b, variant b) of `label_differences`: each fixed-depth
    frontier run against the one before it, each `compare:` pair [a, b] as a - b, and on each
    run's own weights the oracle's depth and the learned depth against the model run at full depth."""
    frontier = study.get("frontier") or []
    pairs = [(f"{b} - {a}", b, "as_trained", a, "as_trained") for a, b in itertools.pairwise(frontier)]
    pairs += [(f"{a} - {b}", a, "as_trained", b, "as_trained") for a, b in study.get("compare", [])]
    for name in study["runs"]:
        pairs.append((f"{name}: oracle depth - as trained", name, "oracle_depth", name, "as_trained"))
        pairs.append((f"{name}: read at the needed pass - as trained", name, "readout_at_need", name, "as_trained"))
        pairs.append((f"{name}: oracle depth - read at the needed pass", name, "oracle_depth", name, "readout_at_need"))
        pairs.append((f"{name}: as trained - full depth", name, "as_trained", name, "full_depth"))
    return pairs


def label_differences(study: dict[str, Any], results: dict[int, dict[str, dict[str, Any]]]) -> str:
    """Accuracy differences per label of the synthetic task, each with a 95% paired bootstrap
    interval over the validation blocks (every run is scored on the same blocks; the blocks of
    every seed both sides finished are resampled, each seed within itself). Empty for other data."""
    from ponder_lightning.evaluate import paired_bootstrap

    lines: list[str] = []
    for title, run_a, variant_a, run_b, variant_b in label_pairs(study):
        a_side, b_side = label_reports(results, run_a, variant_a), label_reports(results, run_b, variant_b)
        sides = [(a_side[s], b_side[s]) for s in a_side if s in b_side]
        if not sides:
            continue
        if not lines:
            labels = list(sides[0][0]["labels"])
            lines = [
                "Accuracy differences per label, with 95% paired bootstrap intervals over the validation blocks "
                "(pooled over the seeds both sides finished; each seed's blocks resampled within it).",
                "",
                "| difference | seeds | " + " | ".join(labels) + " |",
                "|---|---|" + "---|" * len(labels),
            ]
        cells = []
        for label in labels:
            if not all(label in a["labels"] and label in b["labels"] for a, b in sides):
                cells.append("")
                continue
            point, low, high = paired_bootstrap(
                [a["labels"][label]["per_block"] for a, _ in sides], [b["labels"][label]["per_block"] for _, b in sides]
            )
            cells.append(f"{point:+.3f} [{low:+.3f}, {high:+.3f}]")
        lines.append(f"| {title} | {len(sides)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_figure(study: dict[str, Any], results: dict[int, dict[str, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, name in enumerate(study["runs"]):
        rows = [results[s][name] for s in results if "ppl" in results[s].get(name, {})]
        if rows:
            # the colour cycle has 10 colours: from the 11th run on, the marker tells runs apart
            marker = "os^Dv"[i // 10 % 5]
            ax.plot([r["flops_x_vanilla"] for r in rows], [r["ppl"] for r in rows], marker, label=name)
    for seed, runs in results.items():  # each seed's fixed-depth frontier, as `frontier_ppl` reads it
        points = frontier_points(study, runs)
        if len(points) > 1:
            front = undominated(points)
            line = [*front, (points[-1][0], front[-1][1])]  # flat past the best run, up to the deepest
            ax.plot(*zip(*line, strict=True), "k:", linewidth=0.8, label=f"fixed-depth frontier, seed {seed}")
    ax.set_xlabel("inference FLOPs per token (x vanilla), at the depth run")
    ax.set_ylabel("validation perplexity")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot, off the points
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def study_command(argv: list[str], fit: Fit, check: Fit | None = None) -> None:
    """`study --config STUDY.yaml`: train, evaluate and compare every run of an ablation study
    (see ponder_lightning/study.py and studies/*.yaml); rerun the same command to resume."""
    parser = argparse.ArgumentParser(prog="python -m ponder_lightning study", description=study_command.__doc__)
    parser.add_argument("--config", required=True, help="a study file, e.g. studies/reproduce_small.yaml")
    parser.add_argument(
        "--reevaluate",
        action="store_true",
        help="evaluate the finished runs again from their last checkpoints, without training them again (e.g. "
        "after an upgrade); runs not finished yet are trained as usual",
    )
    args = parser.parse_args(argv)
    run_study(args.config, fit, reevaluate=args.reevaluate, check=check)
