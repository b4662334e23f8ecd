"""2-process DDP and FSDP2 on CPU (gloo), run as a user would (`python -m ponder_lightning fit` with
the trainer overlays): AdaPonderLM's losses equal a single-process run on the same global batch,
and a run killed mid-way resumes from its checkpoint with `--ckpt_path last`. (A world size that
does not divide the batch is tested in test_data.py.)"""

from pathlib import Path

import pytest
import torch
from fit_helpers import tiny_fit, trainer_overlay
from scaleout_helpers import (
    ROOT,
    global_selection_inputs,
    global_selection_worker,
    logged_steps,
    read_losses,
    read_records,
    run_fit,
)

from ponder_lightning.cli import main
from ponder_lightning.io.load import load_checkpoint

pytestmark = pytest.mark.timeout(300)

STEPS = 6
KILL_AT = 4
# Tiny AdaPonderLM whose gate is bypassed for the first 2 steps (its parameters get no gradient
# then: DDP must not hang) and gated afterwards. The bottom-K loss has not started (k = 0), so the
# loss is the token mean of the cross-entropy, which decomposes exactly over ranks.
ARGS = [
    *tiny_fit("adaponderlm", batch_size=4),
    "--model.init_args.lr",
    "3e-3",
    "--model.init_args.gate_start_step",
    "2",
]


def overlay(tmp_path: Path, name: str, losses: Path, kill_at: int | None = None) -> str:
    callbacks = [
        {
            "class_path": "ponder_lightning.training.AtomicModelCheckpoint",
            "init_args": {"save_last": True, "every_n_train_steps": 1},
        },
        {"class_path": "scaleout_helpers.LossDump", "init_args": {"path": str(losses)}},
    ]
    if kill_at is not None:
        callbacks.append({"class_path": "scaleout_helpers.KillAtStep", "init_args": {"step": kill_at}})
    return trainer_overlay(tmp_path / f"{name}.yaml", STEPS, callbacks, val_check_interval=3, limit_val_batches=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> list[str]:
    """One token cache for the module: the embedded corpus is tokenised once, not once per run."""
    return ["--data.cache_dir", str(tmp_path_factory.mktemp("cache"))]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, cache) -> tuple[dict[int, float], Path]:
    """Per-step losses and the final checkpoint of the same run on one process."""
    tmp = tmp_path_factory.mktemp("single")
    losses = tmp / "losses.jsonl"
    main(["fit", *ARGS, *cache, "--config", overlay(tmp, "single", losses), "--trainer.default_root_dir", str(tmp)])
    out = read_losses(losses)
    assert sorted(out) == list(range(STEPS))
    return out, tmp / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    "trainer_config, extra",
    [
        ("ddp_cpu.yaml", []),
        # FSDP2 with activation checkpointing: each block is gathered, recomputed and reduced R=4
        # times per step into one sharded gradient.
        ("fsdp2_cpu.yaml", ["--model.init_args.activation_checkpointing", "true"]),
    ],
)
def test_two_processes_match_one_and_resume_after_a_kill(tmp_path, cache, single_process, trainer_config, extra):
    single_process_losses, single_process_checkpoint = single_process
    losses = tmp_path / "losses.jsonl"
    common = [
        *ARGS,
        *cache,
        *extra,
        "--config",
        str(ROOT / "configs" / "trainer" / trainer_config),
        "--trainer.default_root_dir",
        str(tmp_path),
    ]

    killed = run_fit(*common, "--config", overlay(tmp_path, "killed", losses, kill_at=KILL_AT), cwd=tmp_path)
    assert killed.returncode != 0  # SIGKILLed after step 4, before that step's checkpoint
    before = read_losses(losses)
    assert sorted(before) == list(range(KILL_AT))
    checkpoint = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert checkpoint.exists() and not list(checkpoint.parent.glob(".*.tmp"))

    resumed = run_fit(*common, "--config", overlay(tmp_path, "resumed", losses), "--ckpt_path", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = read_losses(losses)
    assert logged_steps(losses) == [*range(KILL_AT), *range(KILL_AT - 1, STEPS)]  # resumed at step 3, not from 0
    # Step 3 ran twice: before the kill and again from the step-3 checkpoint.
    assert after[KILL_AT - 1] == before[KILL_AT - 1]
    for step in range(STEPS):
        assert after[step] == pytest.approx(single_process_losses[step], abs=1e-5), (step, after, single_process_losses)
    # The final checkpoint (a file under DDP, a directory of shards under FSDP) loads as a whole
    # model that computes what the single-process model computes.
    model, data = load_checkpoint(tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt")
    reference, _ = load_checkpoint(single_process_checkpoint)
    assert data["global_step"] == STEPS and type(model) is type(reference)
    ids = torch.randint(0, 257, (2, 32))
    with torch.no_grad():
        assert torch.allclose(model(ids), reference(ids), atol=1e-4, rtol=0)


# -- batch-global gate and ponder loss with halting active ----------------------------------------
def test_bottom_k_loss_and_gate_are_batch_global_across_ranks(tmp_path):
    """2 gloo ranks, each on its contiguous half of a global batch full of exact ties (also
    across the ranks): BottomKPonderLoss returns and describes the one-process loss, and each
    rank's gradient is world_size x the one-process gradient of its rows (DDP's mean over ranks
    then is the one-process gradient); BottomKGate halts the same tokens and learns the same
    thresholds as one process."""
    # fork: the ranks inherit the imports (a spawned rank would spend seconds importing Lightning)
    torch.multiprocessing.start_processes(
        global_selection_worker, args=(2, str(tmp_path)), nprocs=2, start_method="fork"
    )
    single = torch.load(tmp_path / "single.pt")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for operand in ("score", "log_score"):
        expected = single[operand]
        assert expected["loss"] > 0 and expected["describe"]["k"] > 0
        for r, got in enumerate(ranks):
            assert got[operand]["loss"] == pytest.approx(expected["loss"], abs=1e-6)
            assert got[operand]["describe"] == pytest.approx(expected["describe"])
            for grad, full in zip(got[operand]["grads"], expected["grads"], strict=True):
                torch.testing.assert_close(grad / 2, full[2 * r : 2 * r + 2])
    # the bottom k ends inside a run of equal scores: the tie rule decides which of them count
    case = global_selection_inputs()
    values = torch.cat([s[a] for s, a in zip(case["scores"], case["active"][:-1], strict=True)])
    grads = torch.cat([g[a] for g, a in zip(single["score"]["grads"], case["active"][:-1], strict=True)])
    at_cut = values == single["score"]["describe"]["cutoff_score"]
    assert (grads[at_cut] != 0).any() and (grads[at_cut] == 0).any()
    masks, valid = single["gate"]["active"], case["active"][0]
    for before, after in zip([valid, *masks[:2], valid, *masks[3:5]], masks, strict=True):
        assert (before & ~after).any() and after.any()  # every decision halts some tokens, not all
    for r, got in enumerate(ranks):
        for mine, full in zip(got["gate"]["active"], single["gate"]["active"], strict=True):
            assert torch.equal(mine, full[2 * r : 2 * r + 2])
        assert torch.equal(got["gate"]["thresholds"], single["gate"]["thresholds"])


# Halting active from step 0, as a user would run it: gates on, tokens halting (the MLP gate with a
# threshold that about half the initial scores miss, or BottomKGate halting 30% per decision), and
# the bottom-K ponder loss at k = 0.3 from step 1 on (k = 0 at step 0).
HALTING = [
    *tiny_fit("adaponderlm", batch_size=4),
    "--model.init_args.lr",
    "3e-3",
    "--model.init_args.gate_start_step",
    "0",
    "--model.init_args.regularizer.init_args.k_max",
    "0.3",
    "--model.init_args.regularizer.init_args.start_step",
    "0",
    "--model.init_args.regularizer.init_args.ramp_steps",
    "1",
]
HALTING_GATES = {
    "threshold": ["--model.init_args.gate.init_args.init_bias", "0.0", "--model.init_args.gate.init_args.tau", "0.5"],
    "bottom_k": [
        "--config",
        str(ROOT / "configs" / "gates" / "bottom_k.yaml"),
        "--model.init_args.gate.init_args.ratio",
        "0.3",
    ],
}
HALTING_STEPS = 4


def halting_overlay(tmp_path: Path, losses: Path) -> str:
    callbacks = [{"class_path": "scaleout_helpers.LossDump", "init_args": {"path": str(losses)}}]
    return trainer_overlay(
        tmp_path / "halting.yaml", HALTING_STEPS, callbacks, enable_checkpointing=False, logger=False
    )


@pytest.mark.parametrize("trainer_config, gate", [("ddp_cpu.yaml", "threshold"), ("fsdp2_cpu.yaml", "bottom_k")])
def test_two_processes_match_one_with_halting_active(tmp_path, cache, trainer_config, gate):
    """Losses, the ponder loss each rank computes and the mean depth equal one process on the
    same global batch at every step, with tokens halting and the ponder loss on."""
    runs = {}
    for name in ("single", "two"):
        out = tmp_path / name
        out.mkdir()
        args = [
            *HALTING,
            *HALTING_GATES[gate],
            *cache,
            "--config",
            halting_overlay(out, out / "losses.jsonl"),
            "--trainer.default_root_dir",
            str(out),
        ]
        if name == "single":
            main(["fit", *args])
        else:
            two = run_fit(*args, "--config", str(ROOT / "configs" / "trainer" / trainer_config), cwd=out)
            assert two.returncode == 0, two.stderr[-3000:]
        runs[name] = {key: read_records(out / "losses.jsonl", key) for key in ("loss", "aux", "depth")}
    single, two = runs["single"], runs["two"]
    assert sorted(single["loss"]) == sorted(two["loss"]) == list(range(HALTING_STEPS))
    assert single["aux"][0] == 0 and all(single["aux"][step] > 0 for step in range(1, HALTING_STEPS))
    assert all(1 < single["depth"][step] < 3.9 for step in range(HALTING_STEPS))  # tokens halt, not all at once
    for key in ("loss", "aux", "depth"):
        for step in range(HALTING_STEPS):
            assert two[key][step] == pytest.approx(single[key][step], abs=1e-5), (key, step, two, single)
