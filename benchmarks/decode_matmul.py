"""Decoding's matmuls on CPU: plain (MKL) vs on oneDNN-packed weights (`nn/onednn.py`), by rows.

A decode pass multiplies one row per running sequence by the weights, a prefill iteration one row
per prompt token still active; halting changes how many rows run. For the pythia-70m shape (d 512,
vocabulary 50304) this times, side by side in one process, the LM head (`x @ W.T`), the vocabulary
mixture (`p @ E`) and the six layers' linears, plain and packed.

    python -m benchmarks.decode_matmul [--rows 1 2 4 ...] [--threads N]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import alternate, write_results
from ponder_lightning.nn import onednn
from ponder_lightning.nn.config import backbone_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="pythia-70m")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16, 32, 64, 512])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not onednn.available():
        raise SystemExit("this build of torch has no oneDNN packed linear: nothing to compare")
    torch.manual_seed(0)
    cfg = backbone_config(args.size, vocab_size=50304)
    d, vocab = cfg.d_model, cfg.vocab_size
    head, table = torch.randn(vocab, d), torch.randn(vocab, d)
    shapes = [(3 * d, d), (d, d), (cfg.d_ff, d), (d, cfg.d_ff)] * cfg.n_layer
    layers = [(torch.randn(out, inp), torch.randn(out)) for out, inp in shapes]
    rows_out = []
    with torch.no_grad(), onednn.prepacked_weights():
        for n in args.rows:
            x, probs = torch.randn(n, d), torch.randn(n, vocab).softmax(-1)
            inputs = {inp: torch.randn(n, inp) for inp in (d, cfg.d_ff)}
            contenders = {
                "head plain": lambda x=x: F.linear(x, head),
                "head packed": lambda x=x: onednn.linear(x, head),
                "mixture plain": lambda probs=probs: probs @ table,
                "mixture packed": lambda probs=probs: onednn.vocab_mixture(probs, table),
                "layers plain": lambda inputs=inputs: [F.linear(inputs[w.shape[1]], w, b) for w, b in layers],
                "layers packed": lambda inputs=inputs: [onednn.linear(inputs[w.shape[1]], w, b) for w, b in layers],
            }
            ms = {k: 1000 * v for k, v in alternate(contenders, args.repeats).items()}
            row = {"rows": n}
            for part in ("head", "mixture", "layers"):
                row[f"{part} plain ms"], row[f"{part} packed ms"] = ms[f"{part} plain"], ms[f"{part} packed"]
                row[f"{part} plain/packed"] = ms[f"{part} plain"] / ms[f"{part} packed"]
            rows_out.append(row)
    write_results("decode_matmul", rows_out, list(rows_out[0]))


if __name__ == "__main__":
    main()
