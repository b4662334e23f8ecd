"""2-process DDP and FSDP2 on CPU (gloo), run as a user would (`python -m ponder_lightning fit` with
the trainer overlays): AdaPonderLM's losses equal a single-process run on the same global batch,
and a run killed mid-way resumes from its checkpoint with `--ckpt_path last`. (A world size that
does not divide the batch is tested in test_data.py.)"""

from pathlib import Path

import pytest
import torch
import yaml
from scaleout_helpers import ROOT, logged_steps, read_losses, run_fit

from ponder_lightning.cli import main
from ponder_lightning.models.checkpoint import load_checkpoint

pytestmark = pytest.mark.timeout(300)

STEPS = 6
KILL_AT = 4
# Tiny AdaPonderLM whose gate is bypassed for the first 2 steps (its parameters get no gradient
# then: DDP must not hang) and gated afterwards. The bottom-K loss has not started (k = 0), so the
# loss is the token mean of the cross-entropy, which decomposes exactly over ranks.
ARGS = [
    "--config", str(ROOT / "configs" / "adaponderlm.yaml"),
    "--data.tokenizer", "bytes", "--data.seq_len", "32", "--data.batch_size", "4",
    "--model.init_args.size", "tiny", "--model.init_args.lr", "3e-3", "--model.init_args.gate_start_step", "2",
]


def overlay(tmp_path: Path, name: str, losses: Path, kill_at: int | None = None) -> str:
    callbacks = [
        {"class_path": "ponder_lightning.training.AtomicModelCheckpoint", "init_args": {"save_last": True, "every_n_train_steps": 1}},
        {"class_path": "scaleout_helpers.LossDump", "init_args": {"path": str(losses)}},
    ]
    if kill_at is not None:
        callbacks.append({"class_path": "scaleout_helpers.KillAtStep", "init_args": {"step": kill_at}})
    trainer = {
        "max_steps": STEPS, "val_check_interval": 3, "limit_val_batches": 1, "num_sanity_val_steps": 0,
        "enable_progress_bar": False, "enable_model_summary": False, "callbacks": callbacks,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"trainer": trainer}))
    return str(path)


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
    common = [*ARGS, *cache, *extra, "--config", str(ROOT / "configs" / "trainer" / trainer_config), "--trainer.default_root_dir", str(tmp_path)]

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
