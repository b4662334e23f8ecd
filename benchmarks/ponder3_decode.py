"""PonderLM-3 decoding: do the latent steps its router prunes save real wall-clock time?

Side by side in one process, CPU fp32, decode phase timed: PonderLM-2 with K = 3 (every token
runs 4 slots) vs PonderLM-3 on the same backbone weights with tau set for about 2.5, 2 and 1.5
mean latent steps per token (of 3), and PonderLM-3 at tau = 0 (no pruning: the router and its
attention bias only). Decoding as `generate` runs it (row-wise: each backbone call runs every
row's own next slot) and, for comparison, in lock-step (`extend`: every row's token finishes
before the next starts). Per row: tokens/s, mean latent steps, FLOPs x vanilla at the realised
depth, measured speedup over PonderLM-2, ideal speedup from FLOPs and measured/ideal.
Random weights (speed does not depend on training); the router's weights are randomised so that
its distributions spread over tokens and a threshold picks the pruning rate.

    python -m benchmarks.ponder3_decode [--size llama-70m] [--prompt_len 64] [--new_tokens 32] [--threads 1]

At `--size tiny` the LM head (vocabulary 50304) dominates the FLOPs and per-call overhead the
time, so "ideal" and "measured" there test only that the script runs.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.adaptive_decode import fractions
from benchmarks.common import Decoder, Generate, alternate, write_results
from ponder_lightning.models import PonderLM2, PonderLM3

VOCAB = 50304


def calibrated_tau(model: PonderLM3, ids: torch.Tensor, steps: float) -> float:
    """Threshold giving about `steps` mean latent steps per token on `ids` (bisection on log tau
    over the router's w from one teacher-forced forward)."""
    with torch.no_grad():
        w = torch.stack(model.hidden_states(ids)[1].scores)  # [K, B, T]
    lo, hi = -12.0, 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if (w >= 10**mid).sum(0).float().mean().item() < steps else (mid, hi)
    return 10 ** ((lo + hi) / 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="llama-70m")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=float, nargs="+", default=[2.5, 2.0, 1.5])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a shared CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    context = args.prompt_len + args.new_tokens
    for batch in args.batches:
        prompts = torch.randint(0, 50277, (batch, args.prompt_len))
        ponder2 = PonderLM2(size=args.size, vocab_size=VOCAB, latent_steps=3).eval()
        models = {"PonderLM-2 K=3": ponder2}
        variants = [("PonderLM-3 tau=0", None)] + [(f"PonderLM-3 ~{s:g} steps", s) for s in args.steps]
        for name, steps in variants:
            model = PonderLM3(size=args.size, vocab_size=VOCAB, latent_steps=3).eval()
            model.backbone.load_state_dict(ponder2.backbone.state_dict())
            with torch.no_grad():
                torch.manual_seed(1)  # the same router in every variant
                model.router.net.weight.normal_(0, 0.5)
            model.latent.tau = 0.0 if steps is None else calibrated_tau(model, prompts, steps)
            models[name] = model
        generators = {name: Generate(model, prompts, args.new_tokens) for name, model in models.items()}
        lockstep = {name: Decoder(model, prompts, args.new_tokens) for name, model in models.items()}
        with torch.no_grad():
            alternate(generators | {f"{name} lock-step": d for name, d in lockstep.items()}, args.repeats)
        schedules = {
            "row-wise": (
                {name: g.seconds("decode") for name, g in generators.items()},
                {name: g.counts("decode") for name, g in generators.items()},
            ),
            "lock-step": (
                {name: d.seconds() for name, d in lockstep.items()},
                {name: d.decode_counts for name, d in lockstep.items()},
            ),
        }
        ref_name = "PonderLM-2 K=3"
        for schedule, (seconds, counts) in schedules.items():
            ref_flops = ponder2.realised_flops(fractions(counts[ref_name]), context)["x_vanilla"]
            for name, model in models.items():
                flops = model.realised_flops(fractions(counts[name]), context)["x_vanilla"]
                measured, ideal = seconds[ref_name] / seconds[name], ref_flops / flops
                rows.append(
                    {
                        "batch": batch,
                        "decode": schedule,
                        "model": name,
                        "tau": f"{model.latent.tau:.2g}" if model.latent.router is not None else "-",
                        "mean steps": sum(counts[name][1:]) / counts[name][0],
                        "x_vanilla": flops,
                        "tok/s": counts[name][0] / seconds[name],
                        "measured speedup": measured,
                        "ideal speedup": ideal,
                        "measured/ideal": measured / ideal,
                    }
                )
    write_results("ponder3_decode", rows, list(rows[0]))


if __name__ == "__main__":
    main()
