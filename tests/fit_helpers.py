"""What the tests that train through the command line share: the arguments of a tiny byte-level
run of a shipped config, and the trainer overlay file the scale-out tests hand to `fit`."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny_fit(config: str, seq_len: int = 32, batch_size: int = 2) -> list[str]:
    """`--config configs/<config>.yaml` at the `tiny` size on the bytes tokenizer: a step takes
    well under a second on CPU (the NeoX path is covered by the data tests)."""
    return [
        "--config",
        str(ROOT / "configs" / f"{config}.yaml"),
        "--data.tokenizer",
        "bytes",
        "--model.init_args.size",
        "tiny",
        "--data.seq_len",
        str(seq_len),
        "--data.batch_size",
        str(batch_size),
    ]


def quiet_fit_on(data_files: Path, tmp_path: Path) -> list[str]:
    """Flags of a run on the test's own text files: its own token cache and log root under
    `tmp_path`, no validation, no progress bar."""
    return [
        "--data.data_files",
        str(data_files),
        "--data.cache_dir",
        str(tmp_path / "cache"),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]


def trainer_overlay(path: Path, max_steps: int, callbacks: list[dict], **settings) -> str:
    """Writes a `trainer:` overlay to `path` and returns it: `max_steps`, `callbacks`, no
    validation unless `settings` ask for it, no sanity check, no progress bar or model summary."""
    trainer = {
        "max_steps": max_steps,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": callbacks,
    } | settings
    path.write_text(yaml.safe_dump({"trainer": trainer}))
    return str(path)
