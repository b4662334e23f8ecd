"""Adaptive-depth decoding: is the compute saved by halted tokens real wall-clock time?

Side by side in one process, fp32 (CPU by default, `--device cuda` for a GPU), batch 1 and 8,
prefill and decode timed separately:
- AdaPonderLM with its gate thresholds set for ~10%, ~30% and ~60% of token-iterations halted,
  vs the same model at full depth (tau = 0): measured speedup, ideal speedup from FLOPs at the
  realised depth, and measured / ideal (target >= 0.8). Decoding is timed as `generate` runs it
  (row-wise: each backbone call advances every row by one pass of its own token) and, for
  comparison, in lock-step (every row runs iteration i before any row runs i+1). `passes` counts
  the backbone calls; where a call costs the same at any number of active rows (a small batch
  is bound by reading the weights), the speedup cannot beat full depth's passes / these passes
  (the pass bound; target at batch > 1: measured >= 0.9 x the pass bound). At batch > 1 row-wise
  decoding also runs with `compile_attention` (rows at different iterations attend to their
  caches in place instead of copying them for SDPA; compiled during the warm-up run).
- PonderLM decode tokens/s vs the rate predicted from FLOPs: vanilla tokens/s x vanilla FLOPs /
  PonderLM FLOPs (mixture included) (target >= 0.9).
- PonderLM without caches (the whole prefix recomputed for every token, as the authors' code
  does), for reference.
Random weights (speed does not depend on training); the gate's last layer is randomised so that
scores spread over (0, 1) and a threshold picks the halting rate.

    python -m benchmarks.adaptive_decode [--size pythia-70m] [--prompt_len 128] [--new_tokens 32] [--device cuda]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import Decoder, Generate, alternate, write_results
from ponder_lightning.models import AdaPonderLM, PonderLM, VanillaLM

VOCAB = 50304


def calibrated_tau(model: AdaPonderLM, ids: torch.Tensor, halted: float) -> float:
    """Threshold giving about `halted` of the token-iterations halted on `ids` (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(12):  # 2^-12 resolution on tau is far finer than the rates we aim at
        model.gate.tau = (lo + hi) / 2
        with torch.no_grad():
            fractions = model.hidden_states(ids)[1].active_fractions()
        lo, hi = (model.gate.tau, hi) if 1 - fractions.mean().item() < halted else (lo, model.gate.tau)
    return model.gate.tau


def no_cache_decode(model, prompts: torch.Tensor, new_tokens: int):
    def run():
        ids = prompts
        for _ in range(new_tokens):
            with torch.no_grad():
                token = model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], 1)

    return run


def fractions(counts: list[int]) -> list[float]:
    return [c / counts[0] for c in counts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="pythia-70m")
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.3, 0.6])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--skip_uncached", action="store_true", help="leave out PonderLM without caches (minutes per run at batch 8)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    context = args.prompt_len + args.new_tokens
    for batch in args.batches:
        prompts = torch.randint(0, 50277, (batch, args.prompt_len), device=args.device)
        # --- AdaPonderLM: adaptive vs the same model at full depth -------------------------
        full = AdaPonderLM(size=args.size, vocab_size=VOCAB).to(args.device).eval()
        with torch.no_grad():
            for mlp in full.gate.mlps:
                mlp[2].weight.normal_(0, 0.5)
                mlp[2].bias.zero_()
        full.gate.tau = 0.0
        models = {"full depth": full}
        for rate in args.rates:
            model = AdaPonderLM(size=args.size, vocab_size=VOCAB).to(args.device).eval()
            model.load_state_dict(full.state_dict())
            calibrated_tau(model, prompts, rate)
            models[f"halt~{rate:.0%}"] = model
        generators = {name: Generate(model, prompts, args.new_tokens) for name, model in models.items()}
        compiled = {
            name: Generate(model, prompts, args.new_tokens, compile_attention=True)
            for name, model in (models.items() if batch > 1 else ())
        }
        lockstep = {name: Decoder(model, prompts, args.new_tokens) for name, model in models.items()}
        with torch.no_grad():
            alternate(
                generators
                | {f"{name} compiled attention": g for name, g in compiled.items()}
                | {f"{name} lock-step": d for name, d in lockstep.items()},
                args.repeats,
            )
        phases = [("prefill", generators, "prefill"), ("decode row-wise", generators, "decode")]
        phases += [("decode row-wise, compiled attention", compiled, "decode")] if compiled else []
        timings = {
            phase: (
                {name: g.seconds(key) for name, g in runs.items()},
                {name: g.counts(key) for name, g in runs.items()},
                {name: g.passes(key) for name, g in runs.items()},
            )
            for phase, runs, key in phases
        }
        timings["decode lock-step"] = (
            {name: d.seconds() for name, d in lockstep.items()},
            {name: d.decode_counts for name, d in lockstep.items()},
            {name: d.decode_passes for name, d in lockstep.items()},
        )
        for phase, (seconds, counts, passes) in timings.items():
            ref_flops = full.realised_flops(fractions(counts["full depth"]), context)["x_vanilla"]
            for name, model in models.items():
                flops = model.realised_flops(fractions(counts[name]), context)["x_vanilla"]
                measured, ideal = seconds["full depth"] / seconds[name], ref_flops / flops
                pass_bound = passes["full depth"] / passes[name]
                rows.append(
                    {
                        "model": "AdaPonderLM",
                        "batch": batch,
                        "phase": phase,
                        "variant": name,
                        "halted": 1 - sum(fractions(counts[name])) / len(counts[name]),
                        "x_vanilla": flops,
                        "tok/s": counts[name][0] / seconds[name],
                        "measured speedup": measured,
                        "ideal speedup": ideal,
                        "measured/ideal": measured / ideal,
                        "passes": passes[name],
                        "speedup if passes cost alike": pass_bound,
                        "measured/pass bound": measured / pass_bound,
                    }
                )
        # --- PonderLM vs vanilla, with and without caches ----------------------------------
        ponder = PonderLM(size=args.size, vocab_size=VOCAB).to(args.device).eval()
        vanilla = VanillaLM(size=args.size, vocab_size=VOCAB).to(args.device).eval()
        generators = {
            "PonderLM": Generate(ponder, prompts, args.new_tokens),
            "vanilla": Generate(vanilla, prompts, args.new_tokens),
        }
        uncached = (
            {} if args.skip_uncached else {"PonderLM no cache": no_cache_decode(ponder, prompts, args.new_tokens - 1)}
        )
        with torch.no_grad():
            seconds = alternate(generators | uncached, args.repeats)
        tokens = batch * (args.new_tokens - 1)  # the first new token comes from the prefill
        tps = {name: tokens / g.seconds("decode") for name, g in generators.items()}
        tps |= {name: tokens / seconds[name] for name in uncached}
        ponder_flops = ponder.realised_flops([1.0] * ponder.n_iterations, context)["x_vanilla"]
        predicted = tps["vanilla"] / ponder_flops
        for name in tps:
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "phase": "decode",
                    "variant": "full depth",
                    "halted": 0.0,
                    "x_vanilla": 1.0 if name == "vanilla" else ponder_flops,
                    "tok/s": tps[name],
                    "measured speedup": float("nan"),
                    "ideal speedup": float("nan"),
                    "measured/ideal": tps[name] / predicted if name == "PonderLM" else float("nan"),
                    "passes": float("nan"),
                    "speedup if passes cost alike": float("nan"),
                    "measured/pass bound": float("nan"),
                }
            )
    write_results("adaptive_decode", rows, list(rows[0]))


if __name__ == "__main__":
    main()
