"""Every mistake a user can make with settings and entry points ends in one clear line that names
the culprit, a non-zero exit and no traceback; a diverged run rewinds to the checkpoint the error
names, with a lower learning rate (issue 15)."""

from __future__ import annotations

import inspect
import operator
import types
import typing
from pathlib import Path

import jsonargparse
import pytest
import torch
import yaml
from fit_helpers import tiny_fit
from scaleout_helpers import ROOT, run_fit
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ponder_lightning.gates as gates
import ponder_lightning.models as models
import ponder_lightning.research.controls as research_controls
from ponder_lightning.cli import run_lightning_cli
from ponder_lightning.data import PileDataModule
from ponder_lightning.errors import UserError
from ponder_lightning.research.cli import main
from ponder_lightning.training import AtomicModelCheckpoint, GateOnlyStage
from ponder_lightning.validation import is_restricted

pytestmark = pytest.mark.timeout(300)

PUBLIC = sorted(
    {getattr(models, n) for n in models.__all__}
    | {getattr(gates, n) for n in gates.__all__ if inspect.isclass(getattr(gates, n))}
    | {research_controls.RankedPruning, research_controls.RecordingFullDepth}
    | {PileDataModule, AtomicModelCheckpoint, GateOnlyStage},
    key=lambda c: c.__name__,
)
# Numeric arguments that may take any value, and why.
UNBOUNDED: dict[str, str] = {
    "RankedPruning.cutoffs": "values of the caller's priority: -inf keeps every token, inf none (NaN is refused)"
}
# Values for required arguments that are not under test.
REQUIRED = {"gate": gates.AlwaysContinue(), "steps": 1, "active_fractions": [1.0, 0.5], "tau": 0.5}


def _numeric(hint) -> bool:
    if hint in (int, float) or is_restricted(hint):
        return True
    return any(_numeric(a) for a in typing.get_args(hint) if a is not type(None) and a is not Ellipsis)


def _restricted(hint):
    """(restricted type, wrap) for a hint: wrap(bad) builds the argument (a tuple for tuples)."""
    if is_restricted(hint):
        return hint, lambda bad: bad
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 and not is_restricted(args[0]):
        return _restricted(args[0])  # Optional[tuple[...]] and the like
    if typing.get_origin(hint) is list:
        return (args[0], lambda bad: [bad]) if is_restricted(args[0]) else (None, None)
    if typing.get_origin(hint) is tuple:
        return args[0], lambda bad: (bad,) * (1 if args[-1] is Ellipsis else len(args))
    return (args[0], lambda bad: bad) if len(args) == 1 and is_restricted(args[0]) else (None, None)


def _invalid(restricted) -> float:
    step = 1 if restricted._type is int else 0.5
    for op, ref in restricted._restrictions:
        if op in (operator.ge, operator.gt):
            return ref - step if op is operator.ge else ref
    op, ref = restricted._restrictions[0]
    return ref + step if op is operator.le else ref


def own_numeric_args() -> list[tuple[type, str, typing.Any]]:
    out = []
    for cls in PUBLIC:
        hints = typing.get_type_hints(cls.__init__)
        for name in inspect.signature(cls.__init__).parameters:
            if name in hints and _numeric(hints[name]) and name in cls.__init__.__code__.co_varnames:
                out.append((cls, name, hints[name]))
    return out


@pytest.mark.parametrize(
    "cls, name, hint", own_numeric_args(), ids=lambda x: x.__name__ if inspect.isclass(x) else str(x)
)
def test_every_numeric_init_argument_is_constrained_and_rejected(cls, name, hint):
    restricted, wrap = _restricted(hint)
    if restricted is None:
        assert f"{cls.__name__}.{name}" in UNBOUNDED, (
            f"{cls.__name__}.{name}: {hint} carries no constraint; annotate it (ponder_lightning/validation.py)"
        )
        return
    bad = wrap(_invalid(restricted))
    kwargs = {k: v for k, v in REQUIRED.items() if k in inspect.signature(cls.__init__).parameters and k != name}
    # An abstract base (CausalLMModule) is built as a subclass of the same name that fills in its
    # abstract methods: its constructor's checks are what is under test.
    concrete = (
        type(cls.__name__, (cls,), dict.fromkeys(cls.__abstractmethods__, lambda *a, **k: None))
        if inspect.isabstract(cls)
        else cls
    )
    with pytest.raises(UserError, match=rf"{cls.__name__}: {name}="):  # from Python
        concrete(**kwargs, **{name: bad})
    parser = jsonargparse.ArgumentParser(exit_on_error=False)  # from the CLI, at parse time
    parser.add_class_arguments(cls, "x", skip={k for k in kwargs})
    value = str(list(bad)) if isinstance(bad, (tuple, list)) else str(bad)
    with pytest.raises(jsonargparse.ArgumentError, match=name):
        parser.parse_args([f"--x.{name}={value}"])


def test_the_walk_covers_the_issues_examples():
    covered = {(cls.__name__, name) for cls, name, _ in own_numeric_args()}
    for example in [
        ("PerIterationMLPGate", "tau"),
        ("BottomKPonderLoss", "k_max"),
        ("PonderLM", "pondering_steps"),
        ("PonderLM", "mixture_top_k"),
        ("CausalLMModule", "lr"),
        ("PileDataModule", "seq_len"),
    ]:
        assert example in covered


def cli_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") or ": error: " in last, err[-2000:]
    return last


FIT = ["fit", *tiny_fit("adaponderlm")]


def test_bad_values_are_rejected_at_parse_time_in_one_line(capsys, tmp_path):
    line = cli_error(capsys, *FIT, "--model.init_args.gate.init_args.tau", "3")
    assert "model.init_args.gate.init_args.tau" in line and "got 3" in line and "command line" in line
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("model:\n  init_args:\n    regularizer:\n      init_args:\n        k_max: 2\n")
    line = cli_error(capsys, *FIT, "--config", str(overlay))
    assert "k_max" in line and str(overlay) in line
    line = cli_error(capsys, *FIT, "--model.init_args.mixture_top_k", "0")
    assert "mixture_top_k" in line and "got 0" in line
    line = cli_error(capsys, *FIT, "--model.init_args.mixture_top_k", "1000")
    assert "mixture_top_k=1000 exceeds the vocabulary (384 ids)" in line


def test_yaml_syntax_error_names_the_file_and_line(capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  init_args:\n    lr: [1\n")
    line = cli_error(capsys, *FIT, "--config", str(broken))
    assert str(broken) in line and "line 3" in line and "unicode string" not in line


def test_missing_ckpt_path_is_an_error_before_anything_runs(capsys, tmp_path):
    for sub in ("fit", "validate"):
        line = cli_error(
            capsys,
            sub,
            *FIT[1:],
            "--ckpt_path",
            str(tmp_path / "nope.ckpt"),
            "--trainer.default_root_dir",
            str(tmp_path),
        )
        assert "nope.ckpt does not exist" in line
    assert not (tmp_path / "lightning_logs").exists()


def test_seq_len_beyond_the_context_is_caught_before_tokenising(capsys, tmp_path):
    line = cli_error(capsys, *FIT, "--data.seq_len", "4096", "--data.cache_dir", str(tmp_path / "cache"))
    assert "data.seq_len=4096" in line and "max_seq_len" in line
    assert not (tmp_path / "cache").exists()


def test_tokenizer_path_that_does_not_exist(capsys, tmp_path):
    line = cli_error(capsys, *FIT, "--data.tokenizer", str(tmp_path / "no" / "such" / "dir"))
    assert "does not exist" in line and "offline" not in line.lower()


def fake_checkpoint(path: Path, class_path: str, **hparams) -> Path:
    torch.save(
        {
            "hyper_parameters": {"_class_path": class_path, "size": "tiny", **hparams},
            "state_dict": {},
            "global_step": 0,
        },
        path,
    )
    return path


def test_config_and_checkpoint_model_class_must_agree(capsys, tmp_path):
    ckpt = fake_checkpoint(tmp_path / "ada.ckpt", "ponder_lightning.models.AdaPonderLM")
    before = ckpt.read_bytes()
    line = cli_error(capsys, "validate", "--config", str(ROOT / "configs" / "vanilla.yaml"), "--ckpt_path", str(ckpt))
    assert "AdaPonderLM" in line and "VanillaLM" in line
    assert ckpt.read_bytes() == before


def test_checkpoint_with_a_renamed_argument_names_it(capsys, tmp_path):
    ckpt = fake_checkpoint(tmp_path / "old.ckpt", "ponder_lightning.models.VanillaLM", learning_rate=1e-3)
    line = cli_error(capsys, "validate", "--config", str(ROOT / "configs" / "vanilla.yaml"), "--ckpt_path", str(ckpt))
    assert "learning_rate" in line


GATE = "ponder_lightning.gates.PerIterationMLPGate"


@pytest.mark.parametrize("command", ["generate", "evaluate", "validate"])
@pytest.mark.parametrize(
    "model, config, saved, culprit",
    [
        ("VanillaLM", "vanilla", {"learning_rate": 1e-3}, "learning_rate=0.001"),  # renamed since
        (
            "AdaPonderLM",
            "adaponderlm",
            {"gate": {"class_path": GATE, "init_args": {"tau": 3.0}}},
            "gate.init_args.tau",
        ),  # constrained since
    ],
    ids=["renamed", "out_of_range"],
)
def test_saved_argument_that_no_longer_validates_is_named_by_every_command(
    capsys, tmp_path, command, model, config, saved, culprit
):
    ckpt = fake_checkpoint(tmp_path / "old.ckpt", f"ponder_lightning.models.{model}", **saved)
    before = ckpt.read_bytes()
    argv = {
        "generate": ["generate", "--checkpoint", str(ckpt), "--prompt", "a"],
        "evaluate": ["evaluate", "--checkpoint", str(ckpt), "--out", str(tmp_path / "evaluation")],
        "validate": ["validate", "--config", str(ROOT / "configs" / f"{config}.yaml"), "--ckpt_path", str(ckpt)],
    }[command]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and culprit in lines[0] and str(ckpt) in lines[0], lines
    assert ckpt.read_bytes() == before


@pytest.mark.parametrize(
    "argv, culprit",
    [
        (["generate", "--checkpoint", "x.ckpt", "--prompt", ""], "--prompt"),
        (["generate", "--checkpoint", "x.ckpt", "--prompt", "a", "--max_new_tokens", "0"], "--max_new_tokens"),
        (["evaluate", "--checkpoint", "x.ckpt", "--tau", "1e-3,abc"], "--tau"),
        (["evaluate", "--checkpoint", "x.ckpt", "--tau", "1e-3,2"], "--tau"),
        (["evaluate", "--checkpoint", "x.ckpt", "--out", __file__], "--out"),  # a file, not a directory
        (["export", "--checkpoint", "x.ckpt", "--out", __file__], "--out"),
        (["generate", "--checkpoint", "x.ckpt", "--prompt", "a", "--top_k", "5"], "--temperature"),  # greedy
        (["generate", "--checkpoint", "x.ckpt", "--prompt", "a", "--top_p", "0.9"], "--temperature"),
        (["flops", "--active", "1,x,1,1"], "--active"),
        (["flops", "--active", "1,0.5,0.8,1"], "--active"),  # a halted token never comes back
        (["flops", "--active", "0.9,0.5,0.5,0.5"], "--active"),  # every token runs the first pass
        (["flops", "--active", "1,1.5,1,1"], "--active"),
        (["flops", "--context", "0"], "--context"),
        (["flops", "--context", "-5"], "--context"),
    ],
)
def test_entry_point_arguments_are_checked_before_loading(capsys, argv, culprit):
    line = cli_error(capsys, *argv)  # x.ckpt does not exist: the argument is rejected first
    assert culprit in line


# -- checkpoints that do not fit the command: named before anything is loaded --------------------
QUIET = ["--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"]
QUIET += ["--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, single_thread) -> dict[str, Path]:
    """Two-step tiny runs (bytes tokenizer) of a model whose gate halts tokens and of one whose
    gate never does: config name -> its default_root_dir."""
    root = tmp_path_factory.mktemp("trained")
    for config in ("adaponderlm", "vanilla"):
        main(
            ["fit", *tiny_fit(config), *QUIET, "--trainer.max_steps", "2", "--data.cache_dir", str(root / "cache")]
            + ["--trainer.default_root_dir", str(root / config)]
        )
    return {config: root / config for config in ("adaponderlm", "vanilla")}


def last_ckpt(root: Path) -> Path:
    return root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


def test_ckpt_path_last_is_checked_like_a_named_file(capsys, trained):
    root = trained["vanilla"]
    where = ["--trainer.default_root_dir", str(root), "--data.cache_dir", str(root.parent / "cache")]
    for sub in ("validate", "fit"):  # was: RuntimeError Missing key(s) in state_dict (fit), or a silent validate
        line = cli_error(capsys, sub, *tiny_fit("adaponderlm"), *QUIET, *where, "--ckpt_path", "last")
        assert f"--ckpt_path {last_ckpt(root)} holds a model of class VanillaLM" in line and "AdaPonderLM" in line
    assert sorted(p.name for p in (root / "lightning_logs").iterdir()) == ["version_0"]
    # With the right config, validate evaluates the model as the checkpoint has it (lr 1e-3 there).
    cli = run_lightning_cli(
        ["validate", *tiny_fit("vanilla"), *where, "--ckpt_path", "last", "--model.init_args.lr", "0.5"]
        + ["--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]
    )
    assert cli.config.validate.ckpt_path == str(last_ckpt(root)) and cli.model.hparams.lr == 1e-3


def test_ckpt_path_last_without_a_checkpoint_says_so_once(capsys, tmp_path):
    args = [*tiny_fit("vanilla"), *QUIET, "--trainer.default_root_dir", str(tmp_path)]
    line = cli_error(capsys, "validate", *args, "--ckpt_path", "last")
    assert "--ckpt_path last: there is no last.ckpt in" in line and str(tmp_path) in line
    with pytest.warns(UserWarning) as warned:
        main(["fit", *args, "--ckpt_path", "last", "--trainer.max_steps", "1"])
    messages = [str(w.message) for w in warned]
    assert sum("training starts from step 0" in m for m in messages) == 1, messages
    assert not any("no last checkpoint available" in m for m in messages)  # Lightning's own, replaced


def test_ckpt_path_to_a_directory_that_is_no_checkpoint(capsys, tmp_path):
    line = cli_error(capsys, "validate", *tiny_fit("vanilla"), "--ckpt_path", str(tmp_path))
    assert f"--ckpt_path {tmp_path} is a directory but not an FSDP checkpoint" in line  # was IsADirectoryError


def test_settings_that_change_the_weights_are_named(capsys, trained, tmp_path):
    ckpt = last_ckpt(trained["vanilla"])
    args = [*tiny_fit("vanilla"), *QUIET, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(ckpt)]
    line = cli_error(capsys, "validate", *args, "--data.tokenizer", "neox")  # was RuntimeError size mismatch
    assert "does not fit the model built here" in line and "data.tokenizer bytes -> neox" in line
    line = cli_error(capsys, "fit", *args, "--model.init_args.n_layer", "3")
    assert "missing backbone.layers.2." in line and "n_layer None -> 3" in line
    line = cli_error(capsys, "generate", "--checkpoint", str(ckpt), "--prompt", "a", "--tokenizer", "neox")
    assert "--tokenizer neox has 50277 tokens but the model's vocabulary has 384" in line  # was IndexError


def test_train_only_gates_needs_a_gate_with_parameters(capsys):
    line = cli_error(capsys, "fit", *tiny_fit("ponderlm"), "--model.init_args.train_only_gates", "true")
    assert "model.init_args.train_only_gates=true: PonderLM has no trainable parameters" in line
    assert "AlwaysContinue" in line  # was RuntimeError: element 0 of tensors does not require grad


def test_a_ponder_loss_without_scores_to_act_on_is_named():
    """A regularizer on a gate without scores (AlwaysContinue, FixedRatioGate) would silently do
    nothing; the shipped fixed-pruning configs say NoPonderLoss."""
    from ponder_lightning.gates import BottomKPonderLoss, FixedRatioGate
    from ponder_lightning.models import AdaPonderLM, PonderLM

    with pytest.warns(UserWarning, match="regularizer BottomKPonderLoss acts on gate scores, and the gate AlwaysCont"):
        PonderLM(size="tiny", vocab_size=256, regularizer=BottomKPonderLoss())
    with pytest.warns(UserWarning, match="gate FixedRatioGate has none"):
        AdaPonderLM(size="tiny", vocab_size=256, gate=FixedRatioGate(target_depth=3.0))
    config = yaml.safe_load((ROOT / "configs" / "gates" / "fixed_geometric.yaml").read_text())
    assert config["model"]["init_args"]["regularizer"]["class_path"].endswith("NoPonderLoss")


def test_evaluate_checks_its_inputs_before_evaluating(capsys, trained, tmp_path):
    ada, vanilla, out = last_ckpt(trained["adaponderlm"]), last_ckpt(trained["vanilla"]), tmp_path / "out"
    line = cli_error(capsys, "evaluate", "--checkpoint", str(ada), "--reference", "nope.ckpt", "--out", str(out))
    assert "nope.ckpt does not exist" in line
    line = cli_error(capsys, "evaluate", "--checkpoint", str(vanilla), "--reference", str(ada), "--out", str(out))
    assert "--reference: VanillaLM (gate AlwaysContinue) never halts a token" in line  # was silently ignored
    assert list(out.iterdir()) == []  # created and checked first, but nothing was evaluated
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "too short"}\n')
    line = cli_error(capsys, "evaluate", "--checkpoint", str(vanilla), "--data_files", str(small), "--out", str(out))
    assert f"--data_files {small} holds too little text" in line and "lower" not in line
    # A run trained on pre-tokenised data: --data_files replaces that data too.
    ckpt = torch.load(vanilla, weights_only=False)
    ckpt["datamodule_hyper_parameters"].update(data_files=None, tokens=str(tmp_path / "shards"))
    torch.save(ckpt, tmp_path / "tokens.ckpt")
    line = cli_error(
        capsys, "evaluate", "--checkpoint", str(tmp_path / "tokens.ckpt"), "--data_files", str(small), "--out", str(out)
    )
    assert "holds too little text" in line and "both set" not in line


# -- divergence and resume, end to end ---------------------------------------------------------
TINY_FIT = [
    *tiny_fit("vanilla"),
    "--trainer.limit_val_batches",
    "0",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--checkpoint_every",
    "1",
    "--model.init_args.lr",
    "3e-3",
]


def logged(version: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(version))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def test_diverged_run_rewinds_to_last_good_with_a_lower_lr(tmp_path):
    common = [
        *TINY_FIT,
        "--data.cache_dir",
        str(tmp_path / "cache"),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.log_every_n_steps",
        "1",
    ]
    healthy = run_fit(*common, "--trainer.max_steps", "4", cwd=tmp_path)
    assert healthy.returncode == 0, healthy.stderr[-3000:]
    first = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    assert (first / "last_good.ckpt").is_file()

    # A huge LR on resume is applied (with a notice) and diverges: the error names last_good.ckpt.
    diverged = run_fit(
        *common, "--trainer.max_steps", "12", "--ckpt_path", "last", "--model.init_args.lr", "1e30", cwd=tmp_path
    )
    assert diverged.returncode == 2, diverged.stderr[-3000:]
    assert "lr 0.003 -> 1e+30" in diverged.stderr
    assert "not resumable" not in diverged.stderr  # the loader's position is in the checkpoint
    errors = [line for line in diverged.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training loss became nan" in errors[0] and "Traceback" not in diverged.stderr
    named = Path(errors[0].split("--ckpt_path ")[1].split()[0])
    assert named.name == "last_good.ckpt" and named.is_file()
    good = torch.load(named, weights_only=True)
    assert all(torch.isfinite(t).all() for t in good["state_dict"].values())  # not damaged by the divergence

    # A save killed half-way leaves a temporary file; a run resumed from that directory names it but
    # leaves it (another run may be writing there; a run removes only its own directory's).
    stale = named.parent / ".last.ckpt.tmp"
    stale.write_bytes(b"half a checkpoint")
    # Rewind: resume from the named checkpoint with a lower LR.
    rewound = run_fit(
        *common,
        "--trainer.max_steps",
        str(good["global_step"] + 4),
        "--ckpt_path",
        str(named),
        "--model.init_args.lr",
        "1e-4",
        cwd=tmp_path,
    )
    assert rewound.returncode == 0, rewound.stderr[-3000:]
    assert stale.exists() and f"{named.parent} holds 1 temporary checkpoint file(s)" in rewound.stderr
    assert "not resumable" not in rewound.stderr
    version = sorted((tmp_path / "lightning_logs").iterdir(), key=lambda p: int(p.name.split("_")[1]))[-1]
    lrs, losses = logged(version, "train/lr"), logged(version, "train/loss")
    assert lrs and all(1e-5 * (1 - 1e-6) <= lr <= 1e-4 * (1 + 1e-6) for lr in lrs), (
        lrs
    )  # the new peak (min_lr_ratio 0.1), scheduled
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses
