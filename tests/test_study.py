"""The study runner: every run trained through `fit`, evaluated on the same blocks with the
controls, runs matched to another run's result, summary with seeds, and resume after a stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ponder_lightning.errors import UserError
from ponder_lightning.research.cli import main
from ponder_lightning.research.study import (
    DIFFICULTY_MONITOR,
    ROOT,
    frontier_ppl,
    frontier_table,
    load_study,
    mean_spread,
    resolve,
    run_order,
    summary_table,
)

TINY = [
    "--trainer.max_steps",
    "3",
    "--trainer.log_every_n_steps",
    "1",
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


def test_a_run_scored_on_other_validation_blocks_is_refused(tmp_path, capsys):
    """Every run of a study is scored on the same blocks: a run whose overlay changes them fails
    with the data setting named, and the others are still evaluated."""
    path = write_study(
        tmp_path,
        seeds=[1],
        runs={
            "vanilla": {"configs": ["configs/vanilla.yaml"]},
            "shorter": {"configs": ["configs/vanilla.yaml"], "args": ["--data.seq_len", "16"]},
        },
    )
    main(["study", "--config", str(path)])
    results = json.loads((tmp_path / "out" / "results.json").read_text())["1"]
    assert "ppl" in results["vanilla"]
    assert "data.seq_len=16 (not 32)" in results["shorter"]["error"]
    assert "shorter | failed: its validation blocks differ from vanilla's" in capsys.readouterr().out
    # The failed run is not recorded as done: running the study again gives the same answer.
    main(["study", "--config", str(path)])
    assert "data.seq_len=16" in json.loads((tmp_path / "out" / "results.json").read_text())["1"]["shorter"]["error"]


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
        # Training compute: training runs every pass for every token (halted ones masked), so a
        # gated run trains at what its full depth costs, above the depth it infers at.
        assert results[seed]["vanilla"]["train_flops_x_vanilla"] == 1.0
        full_depth = next(r for r in ada["controls"] if r["kind"] == "full_depth")
        assert ada["train_flops_x_vanilla"] == pytest.approx(full_depth["flops_x_vanilla"], rel=1e-9)
        assert ada["train_flops_x_vanilla"] > ada["flops_x_vanilla"]
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

    # The evaluation gained controls since a study was trained: --reevaluate redoes every run's
    # evaluation from its checkpoint and trains nothing.
    stale = out / "runs" / "ada" / "seed_1" / "result.json"
    stale.write_text(json.dumps({"train_minutes": 1.5, "ppl": 0.0}))
    capsys.readouterr()
    main(["study", "--config", str(path), "--reevaluate"])
    log = capsys.readouterr().out
    assert log.count("evaluating again") == 6 and "training" not in log
    again = json.loads(stale.read_text())
    assert again["ppl"] == pytest.approx(results["1"]["ada"]["ppl"], rel=1e-6) and again["train_minutes"] == 1.5
    assert {"ppl_entropy_least_sure", "ppl_entropy_surest", "ppl_oracle_hardest", "ppl_oracle_gain"} <= set(again)
    assert "| ada | 1 |" in (out / "summary.md").read_text().split("Which tokens go on")[1]


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
    with pytest.raises(UserError, match=r"frontier run\(s\) \['ponderlm'\] are not runs"):
        load_study(write_study(tmp_path, frontier=["vanilla", "ponderlm"]))
    with pytest.raises(UserError, match="cycle"):
        run_order({"a": {"args": ["{b:depth_mean}"]}, "b": {"args": ["{a:pondering_steps}"]}}, None)
    with pytest.raises(UserError, match=r"has \{a:depth\} in its args: a reference is \{run:depth_mean\}"):
        load_study(write_study(tmp_path, runs={"a": {}, "b": {"args": ["{a:depth}"]}}))
    with pytest.raises(UserError, match="seeds must be a list of seeds, got 1"):
        load_study(write_study(tmp_path, seeds=1))
    with pytest.raises(UserError, match="run a: configs must be a list of config files, got 'configs/vanilla.yaml'"):
        load_study(write_study(tmp_path, runs={"a": {"configs": "configs/vanilla.yaml"}}))
    with pytest.raises(UserError, match="eval_batches must be a positive number of batches, got 0"):
        load_study(write_study(tmp_path, eval_batches=0))
    with pytest.raises(UserError, match=r"compare run\(s\) \['ponderlm'\] are not runs"):
        load_study(write_study(tmp_path, compare=[["vanilla", "ponderlm"]]))
    with pytest.raises(UserError, match=r"compare must be a list of \[run, other run\] pairs"):
        load_study(write_study(tmp_path, compare=["vanilla"]))


def test_runs_of_different_sizes_are_compared_in_one_flops_unit(tmp_path):
    """A run's own FLOPs count forwards of its own backbone (a deeper vanilla reads 1.0x there);
    the study puts every run in forwards of the reference run's model, and counts each run's whole
    training compute against the reference's."""
    from ponder_lightning import flops
    from ponder_lightning.nn import backbone_config

    deeper = {"configs": ["configs/vanilla.yaml"], "args": ["--model.init_args.n_layer", "3"]}
    longer = {"configs": ["configs/vanilla.yaml"], "args": ["--trainer.max_steps", "6"]}
    runs = {"vanilla": {"configs": ["configs/vanilla.yaml"]}, "deeper": deeper, "longer": longer}
    path = write_study(tmp_path, seeds=[1], runs=runs)
    main(["study", "--config", str(path)])
    out = tmp_path / "out"
    own = json.loads((out / "runs" / "deeper" / "seed_1" / "result.json").read_text())
    study = json.loads((out / "results.json").read_text())["1"]
    assert own["flops_x_vanilla"] == 1.0 and study["vanilla"]["flops_x_vanilla"] == 1.0
    ratio = flops.vanilla_forward_flops(backbone_config("tiny", vocab_size=384, n_layer=3), 32) / (
        flops.vanilla_forward_flops(backbone_config("tiny", vocab_size=384, n_layer=1), 32)
    )
    assert ratio > 2 and study["deeper"]["flops_x_vanilla"] == pytest.approx(ratio)
    assert study["deeper"]["train_flops_x_vanilla"] == pytest.approx(ratio)
    # the whole run's training compute: the same tokens, so the FLOPs-per-token ratio
    assert study["deeper"]["train_compute_x_reference"] == pytest.approx(ratio)
    # twice the steps at the same FLOPs per token: twice the compute
    assert study["longer"]["train_flops_x_vanilla"] == 1.0 and study["longer"]["train_compute_x_reference"] == 2.0
    assert "FLOPs per token in forwards of the vanilla run's model" in (out / "summary.md").read_text()


def test_a_finished_run_whose_study_entry_changed_is_not_reported_as_the_new_one(tmp_path, capsys):
    """Editing a run's arguments after it trained would otherwise print the old run's numbers
    under the new definition."""
    runs = {"vanilla": {"configs": ["configs/vanilla.yaml"]}}
    path = write_study(tmp_path, seeds=[1], runs=runs)
    main(["study", "--config", str(path)])
    write_study(tmp_path, seeds=[1], runs={"vanilla": runs["vanilla"] | {"args": ["--model.init_args.lr", "0.01"]}})
    for extra in ([], ["--reevaluate"]):
        with pytest.raises(SystemExit):
            main(["study", "--config", str(path), *extra])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "run vanilla seed 1 was trained with other arguments" in err and "--model.init_args.lr 0.01" in err
    write_study(tmp_path, seeds=[1], runs=runs)  # restored: the finished run counts again
    main(["study", "--config", str(path)])
    assert "vanilla seed 1: done earlier, skipped" in capsys.readouterr().out
    # A run trained before studies added the (logging-only) DifficultyMonitor is the same run.
    command = next(tmp_path.rglob("command.txt"))
    command.write_text(command.read_text().replace(" " + DIFFICULTY_MONITOR, ""))
    assert DIFFICULTY_MONITOR not in command.read_text()
    main(["study", "--config", str(path)])
    assert "vanilla seed 1: done earlier, skipped" in capsys.readouterr().out


def test_a_reference_may_name_a_run_with_dots():
    """Run names like ada_k_0.3 are references too (they were once left as literal text)."""
    runs = {"c": {"args": ["--x", "{ada_k_0.3:depth_mean}"]}, "ada_k_0.3": {}, "v": {}}
    assert run_order(runs, "v") == ["v", "ada_k_0.3", "c"]
    assert resolve("--x={ada_k_0.3:depth_mean}", {"ada_k_0.3": {"depth_mean": 1.87}}) == "--x=1.8700"


def test_order_and_spread():
    assert run_order({"c": {"args": ["{a:depth_mean}"]}, "a": {}, "v": {}}, "v") == ["v", "a", "c"]
    assert mean_spread([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert mean_spread([5.0]) == (5.0, 0.0)


def test_the_fixed_depth_frontier_is_interpolated_in_loss_skips_dominated_runs_and_never_extrapolates():
    points = [(5.0, 170.0), (3.0, 180.0)]  # (FLOPs, ppl), in any order
    assert frontier_ppl(points, 3.0) == (pytest.approx(180.0), 3.0, 5.0)
    assert frontier_ppl(points, 5.0) == (pytest.approx(170.0), 3.0, 5.0)
    # halfway in FLOPs: halfway in loss, i.e. the geometric mean of the perplexities
    assert frontier_ppl(points, 4.0)[0] == pytest.approx((170.0 * 180.0) ** 0.5)
    assert frontier_ppl(points, 2.9) is None and frontier_ppl(points, 5.1) is None
    assert frontier_ppl([(3.0, 180.0)], 3.0) is None
    # A deeper run that is worse than a shallower one is no frontier point: fixed depth reaches
    # the shallower run's perplexity with any FLOPs from there on.
    dominated = [(3.0, 170.0), (5.0, 172.0), (1.0, 190.0)]
    assert frontier_ppl(dominated, 4.0) == (pytest.approx(170.0), 3.0, 3.0)
    assert frontier_ppl(dominated, 2.0) == (pytest.approx((170.0 * 190.0) ** 0.5), 1.0, 3.0)


def test_the_frontier_table_compares_each_halting_run_at_its_own_flops():
    study = {"runs": {"p4": {}, "p3": {}, "ada": {}, "vanilla": {}, "far": {}}, "frontier": ["p4", "p3"]}

    def seed(ada_ppl: float) -> dict:
        return {
            "p4": {"ppl": 170.0, "flops_x_vanilla": 5.0},
            "p3": {"ppl": 180.0, "flops_x_vanilla": 3.0},
            "ada": {"ppl": ada_ppl, "flops_x_vanilla": 4.0, "ppl_full_depth": 1.0},
            "far": {"ppl": 200.0, "flops_x_vanilla": 2.0, "ppl_full_depth": 1.0},
            "vanilla": {"ppl": 190.0, "flops_x_vanilla": 1.0},  # fixed depth: not compared
        }

    at_four = (170.0 * 180.0) ** 0.5
    table = frontier_table(study, {1: seed(at_four * 0.99), 2: seed(at_four * 1.03)})
    assert f"| ada | 1 | 4.000 | {at_four * 0.99:.3f} | {at_four:.3f} | 3.00-5.00 | -1.00% |" in table
    assert f"| ada | 2 | 4.000 | {at_four * 1.03:.3f} | {at_four:.3f} | 3.00-5.00 | +3.00% |" in table
    assert "| ada | mean | | | | | +1.00% ± 2.83% |" in table
    assert "| far | 1 | 2.000 | 200.000 | outside the frontier's FLOPs | | |" in table
    assert "| vanilla |" not in table and "| p3 |" not in table
    assert "No fixed-depth frontier" in frontier_table({"runs": {}}, {})


def test_the_summary_says_when_runs_average_different_seeds():
    """A run trained for fewer seeds averages other seeds than the rest; a seed that is harder for
    every model would then decide the comparison, so the summary says so."""

    def row(ppl):
        return {"model": "PonderLM", "gate": "AlwaysContinue", "ppl": ppl}

    study = {"runs": {"a": {}, "b": {"seeds": [1, 2]}}}
    results = {1: {"a": row(100.0), "b": row(99.0)}, 2: {"a": row(101.0), "b": row(100.0)}, 3: {"a": row(110.0)}}
    table = summary_table(study, results)
    assert "Runs average different seeds (a: [1, 2, 3]; b: [1, 2])" in table
    assert "| a | PonderLM / AlwaysContinue | 103.667 ± " in table
    same = summary_table(study, {s: results[s] for s in (1, 2)})
    assert "different seeds" not in same and "| b | PonderLM / AlwaysContinue | 99.500 ± " in same


SHIPPED_STUDIES = sorted(p for p in (ROOT / "studies").glob("*.yaml") if "runs:" in p.read_text())


def test_the_shipped_studies_are_found_where_study_resolves_configs():
    assert len(SHIPPED_STUDIES) >= 5 and (ROOT / "configs" / "vanilla.yaml").is_file()


@pytest.mark.parametrize("path", SHIPPED_STUDIES, ids=lambda p: p.stem)
def test_every_shipped_study_parses_every_run(path):
    """What `study` checks before its first run trains (`check_runs`): configs exist, arguments parse."""
    from ponder_lightning.cli import check_fit_args
    from ponder_lightning.research.study import check_runs

    check_runs(load_study(path), check_fit_args)


def test_a_study_on_a_synthetic_task_tables_each_label_as_trained_and_at_the_oracles_depth(tmp_path):
    from ponder_lightning.research.study import label_table

    spec = "synthetic:pointer_chase:symbols=6,queries=8,n_docs=300"
    args = [*TINY, "--data.data_files", spec, "--data.cache_dir", str(tmp_path / "cache"), "--data.seq_len", "64"]
    path = write_study(
        tmp_path,
        seeds=[1, 2],
        args=args,
        reference=None,
        runs={
            "vanilla": {"configs": ["configs/vanilla.yaml"]},
            "ponderlm_2": {"configs": ["configs/ponderlm.yaml"], "args": ["--model.init_args.pondering_steps", "1"]},
        },
        compare=[["ponderlm_2", "vanilla"]],
    )
    main(["study", "--config", str(path)])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    reports = results["1"]["ponderlm_2"]["labels"]
    assert set(reports) == {"as_trained", "oracle_depth", "readout_at_need"} and set(
        results["1"]["vanilla"]["labels"]
    ) == {"as_trained"}
    assert reports["oracle_depth"]["labels"]["format"]["depth_mean"] == 1.0
    assert reports["oracle_depth"]["flops_x_vanilla"] < reports["as_trained"]["flops_x_vanilla"]
    summary = (tmp_path / "out" / "summary.md").read_text()
    table = label_table(load_study(path), {int(k): v for k, v in results.items()})
    assert table and table in summary
    accuracies = [results[s]["ponderlm_2"]["labels"]["oracle_depth"]["labels"]["k=1"]["accuracy"] for s in ("1", "2")]
    mean, spread = mean_spread(accuracies)
    assert "| ponderlm_2 | oracle depth | " in summary and f"{mean:.3f} ± {spread:.3f}" in summary
    # A `compare:` pair: its difference per label, pooled over the seeds, with the paired interval.
    from ponder_lightning.evaluate import paired_bootstrap

    sides = [[results[s][run]["labels"]["as_trained"]["labels"]["k=1"]["per_block"] for s in ("1", "2")] for run in
             ("ponderlm_2", "vanilla")]  # fmt: skip
    point, low, high = paired_bootstrap(*sides)
    row = next(line for line in summary.splitlines() if line.startswith("| ponderlm_2 - vanilla | 2 |"))
    assert f"{point:+.3f} [{low:+.3f}, {high:+.3f}]" in row
