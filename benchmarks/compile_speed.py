"""Eager vs compiled (`compile: true`: each decoder layer through torch.compile, inductor) training
steps, side by side in one process.

One fwd + bwd + AdamW step of VanillaLM, PonderLM and AdaPonderLM (at initialisation: every token
runs every pass) at the demo's shape (4 x 128, bpe4k's 4096-token vocabulary, 8 x 256 tokens) and
at pythia-14m with the Pythia vocabulary (50304). Both copies start from the same weights; the
compiled one's first step (tracing and code generation) is timed on its own, then the two are
timed in alternation (median of `--repeats`). CPU fp32 by default; `--device cuda --bf16` on a GPU.

    python -m benchmarks.compile_speed [--repeats 5] [--shapes demo pythia-14m]
    python -m benchmarks.compile_speed --device cuda --bf16 --shapes pythia-160m --seq_len 2048
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from benchmarks.common import alternate, time_once, write_results
from ponder_lightning.models import AdaPonderLM, PonderLM, VanillaLM

SHAPES = {
    "demo": dict(size="pythia-14m", n_layer=4, vocab_size=4096),
    "pythia-14m": dict(size="pythia-14m", vocab_size=50304),
    "pythia-160m": dict(size="pythia-160m", vocab_size=50304),  # GPU (benchmarks/gpu_check.sh)
}
MODELS = {"VanillaLM": VanillaLM, "PonderLM": PonderLM, "AdaPonderLM": AdaPonderLM}


def training_step(model, tokens: torch.Tensor, bf16: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            ce, _, trace = model.training_loss(tokens)
            aux = model.aux_loss(trace)
            loss = ce if aux is None else ce + aux
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["demo", "pythia-14m"], choices=list(SHAPES))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU), as precision: bf16-mixed")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for shape in args.shapes:
        for name in args.models:
            torch.manual_seed(0)
            eager = MODELS[name](**SHAPES[shape]).to(device).train()
            compiled = MODELS[name](**SHAPES[shape]).to(device).train()
            compiled.load_state_dict(eager.state_dict())
            compiled.backbone.compile_layers()
            tokens = torch.randint(0, SHAPES[shape]["vocab_size"], (args.batch, args.seq_len + 1), device=device)
            steps = {
                "eager": training_step(eager, tokens, args.bf16),
                "compiled": training_step(compiled, tokens, args.bf16),
            }
            first = time_once(steps["compiled"])  # compilation included
            seconds = alternate(steps, args.repeats)
            n_tokens = args.batch * args.seq_len
            rows.append(
                {
                    "shape": shape,
                    "model": name,
                    "eager tok/s": n_tokens / seconds["eager"],
                    "compiled tok/s": n_tokens / seconds["compiled"],
                    "compiled / eager speed": seconds["eager"] / seconds["compiled"],
                    "first compiled step s": first,
                }
            )
            print(rows[-1], flush=True)
    write_results(
        "compile_speed",
        rows,
        ["shape", "model", "eager tok/s", "compiled tok/s", "compiled / eager speed", "first compiled step s"],
    )


if __name__ == "__main__":
    main()
