"""Small-scale reproduction: vanilla, LoopTransformer, PonderLM and AdaPonderLM trained at the
same size, data and step budget on CPU, then evaluated side by side.

Each model is trained through the CLI (`fit`) on the embedded corpus with the byte tokenizer and
the demo's 4-layer d=128 backbone, then evaluated on the same validation blocks: perplexity,
inference FLOPs per token x vanilla at the depth actually run, training time; for AdaPonderLM
also the iso-FLOPs comparison with random pruning and the depth-vs-NLL table.

    python -m benchmarks.reproduce_small [--steps 1500] [--out benchmarks/out/reproduce_small]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import OUT_DIR, machine, write_results
from ponder_lightning.cli import main as cli
from ponder_lightning.data import PileDataModule
from ponder_lightning.evaluate import evaluate, iso_flops_study
from ponder_lightning.models.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["vanilla", "loop", "ponderlm", "adaponderlm"]


def train(name: str, steps: int, out: Path) -> tuple[Path, float]:
    run_dir = out / name
    overrides = [
        "--data.tokenizer", "bytes", "--data.seq_len", "256", "--data.batch_size", "8",
        "--model.init_args.size", "pythia-14m", "--model.init_args.n_layer", "4", "--model.init_args.lr", "2e-3",
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps // 4), "--trainer.limit_val_batches", "4",
        "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
    ]
    if name == "adaponderlm":  # the demo's schedule, scaled to the budget
        start = int(0.375 * steps)
        overrides += ["--model.init_args.gate_start_step", str(start), "--model.init_args.regularizer.init_args.start_step", str(start),
                      "--model.init_args.regularizer.init_args.ramp_steps", str(steps // 4),
                      "--model.init_args.regularizer.init_args.lam", "0.3", "--model.init_args.regularizer.init_args.k_max", "0.2"]
    start_time = time.perf_counter()
    cli(["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"), *overrides])
    seconds = time.perf_counter() - start_time
    return sorted(run_dir.glob("lightning_logs/version_*/checkpoints/last.ckpt"))[-1], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=OUT_DIR / "reproduce_small")
    args = parser.parse_args()
    rows, extra = [], {}
    data = PileDataModule(tokenizer="bytes", seq_len=256, batch_size=8, val_batches=16)
    data.setup("validate")
    for name in MODELS:
        ckpt, seconds = train(name, args.steps, args.out)
        model, _ = load_checkpoint(ckpt)
        result = evaluate(model, data.val_dataloader(), data.seq_len)[0]
        rows.append({
            "model": type(model).__name__, "val ppl": result["ppl"], "mean depth": result["depth_mean"],
            "inference FLOPs x vanilla": result["flops_x_vanilla"], "train minutes": seconds / 60,
        })
        if name == "adaponderlm":
            extra["iso_flops"] = iso_flops_study(model, data.val_dataloader(), data.seq_len)
            extra["depth_vs_nll"] = result["depth_vs_nll"]
            extra["active_fractions"] = result["active_fractions"]
    write_results("reproduce_small", rows, list(rows[0]))
    (OUT_DIR / "reproduce_small_extra.json").write_text(json.dumps(extra | {"machine": machine(), "steps": args.steps}, indent=2))
    print(json.dumps(extra, indent=2))


if __name__ == "__main__":
    main()
