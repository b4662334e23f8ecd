"""The study runner: every run trained through `fit`, evaluated on the same blocks with the
controls, runs matched to another run's result, summary with seeds, and resume after a stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ponder_lightning.cli import main
from ponder_lightning.errors import UserError
from ponder_lightning.study import load_study, mean_spread, run_order

TINY = [
    "--trainer.max_steps",
    "3",
    "--trainer.val_check_interval",
    "3",
    "--trainer.limit_val_batches",
    "1",
    "--model.init_args.size",
    "tiny",
    "--model.init_args.n_layer",
    "1",
    "--data.tokenizer",
    "bytes",
    "--data.batch_size",
    "2",
    "--data.seq_len",
    "32",
]


def write_study(tmp_path: Path, **fields) -> Path:
    study = {
        "out": str(tmp_path / "out"),
        "seeds": [1, 2],
        "base": ["studies/small_base.yaml"],
        "args": TINY,
        "reference": "vanilla",
        "eval_batches": 2,
        "runs": {
            "vanilla": {"configs": ["configs/vanilla.yaml"]},
            "ada": {
                "configs": ["configs/adaponderlm.yaml"],
                "args": [
                    "--model.init_args.gate.init_args.init_bias",
                    "-3.0",
                    "--model.init_args.gate.init_args.tau",
                    "0.05",
                ],
            },
            "fixed": {
                "configs": ["configs/adaponderlm.yaml", "configs/gates/fixed_geometric.yaml"],
                "args": ["--model.init_args.gate.init_args.target_depth", "{ada:depth_mean}"],
            },
        },
    } | fields
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_study_trains_evaluates_matches_and_resumes(tmp_path, capsys):
    path = write_study(tmp_path)
    main(["study", "--config", str(path)])
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"1", "2"} and set(results["1"]) == {"vanilla", "ada", "fixed"}
    for seed in ("1", "2"):
        ada, fixed = results[seed]["ada"], results[seed]["fixed"]
        assert ada["depth_mean"] < 4, "the test needs a gate that halts"
        # The trained control runs at the learned gate's mean depth of the same seed.
        assert (
            f"target_depth {ada['depth_mean']:.4f}"
            in (out / "runs" / "fixed" / f"seed_{seed}" / "command.txt").read_text()
        )
        assert abs(fixed["depth_mean"] - ada["depth_mean"]) < 0.5
        assert {"ppl_full_depth", "ppl_random_pruning", "spearman_nll_reference"} <= set(ada)
    assert results["1"]["ada"]["ppl"] != results["2"]["ada"]["ppl"]  # the seeds differ
    summary = (out / "summary.md").read_text()
    assert (
        "over seeds [1, 2]" in summary and "| ada | AdaPonderLM / PerIterationMLPGate |" in summary and " ± " in summary
    )
    assert (out / "ppl_vs_flops.png").stat().st_size > 1000
    assert sorted(p.parent.name for p in (out / "runs").glob("*/seed_*/events.out.tfevents.*")) == [
        "seed_1",
        "seed_1",
        "seed_1",
        "seed_2",
        "seed_2",
        "seed_2",
    ]

    # A stop in the middle: one run lost its result, another never finished; the same command resumes.
    (out / "runs" / "fixed" / "seed_2" / "result.json").unlink()
    capsys.readouterr()
    main(["study", "--config", str(path)])
    log = capsys.readouterr().out
    assert log.count("done earlier, skipped") == 5 and "fixed seed 2: training" in log
    assert "--ckpt_path" in (out / "runs" / "fixed" / "seed_2" / "command.txt").read_text()
    assert json.loads((out / "results.json").read_text())["2"]["fixed"]["ppl"] == pytest.approx(
        results["2"]["fixed"]["ppl"], rel=1e-6
    )


def test_a_failing_run_is_reported_and_the_study_goes_on(tmp_path):
    """A uniform schedule cannot reach a mean depth below (N+1)/2: the run fails with the reason,
    the runs matched to it fail with theirs, the others finish."""
    path = write_study(
        tmp_path,
        seeds=[1],
        reference=None,
        runs={
            "uniform": {
                "configs": ["configs/adaponderlm.yaml", "configs/gates/fixed_uniform.yaml"],
                "args": ["--model.init_args.gate.init_args.target_depth", "1.5"],
            },
            "matched": {
                "configs": ["configs/ponderlm.yaml"],
                "args": ["--model.init_args.pondering_steps", "{uniform:pondering_steps}"],
            },
            "vanilla": {"configs": ["configs/vanilla.yaml"]},
        },
    )
    main(["study", "--config", str(path)])
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| uniform | failed: " in summary and "geometric" in summary
    assert "| matched | failed: run uniform failed" in summary
    assert "| vanilla | VanillaLM / AlwaysContinue |" in summary


def test_a_run_continues_from_another_runs_export(tmp_path):
    path = write_study(
        tmp_path,
        seeds=[1],
        reference=None,
        runs={
            "start": {"configs": ["configs/vanilla.yaml"]},
            "continued": {
                "configs": ["configs/adaponderlm.yaml"],
                "args": ["--model.init_args.pretrained", "{start:export}"],
            },
        },
    )
    main(["study", "--config", str(path)])
    export = tmp_path / "out" / "runs" / "start" / "seed_1" / "export"
    assert (export / "config.json").is_file()
    assert f"pretrained {export}" in (tmp_path / "out" / "runs" / "continued" / "seed_1" / "command.txt").read_text()
    results = json.loads((tmp_path / "out" / "results.json").read_text())["1"]
    assert results["continued"]["model"] == "AdaPonderLM"


def test_study_file_mistakes_are_named(tmp_path):
    with pytest.raises(UserError, match="not a run of this study"):
        load_study(write_study(tmp_path, runs={"a": {"args": ["{b:depth_mean}"]}}))
    with pytest.raises(UserError, match="unknown study field"):
        load_study(write_study(tmp_path, sead=[1]))
    with pytest.raises(UserError, match="does not exist"):
        load_study(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="cycle"):
        run_order({"a": {"args": ["{b:depth_mean}"]}, "b": {"args": ["{a:pondering_steps}"]}}, None)


def test_order_and_spread():
    assert run_order({"c": {"args": ["{a:depth_mean}"]}, "a": {}, "v": {}}, "v") == ["v", "a", "c"]
    assert mean_spread([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert mean_spread([5.0]) == (5.0, 0.0)
