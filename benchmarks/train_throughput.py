"""Training throughput: our vanilla model vs transformers' GPTNeoXForCausalLM, same weights.

One fwd + bwd + AdamW step, CPU fp32, batch 8 x seq 256, pythia-14m and pythia-70m shapes with the
Pythia vocabulary (50304). Both models run in this process, timed in alternation; the table shows
tokens/s and the ratio ours / transformers.

    python benchmarks/train_throughput.py [--repeats 5] [--sizes pythia-14m pythia-70m]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import GPTNeoXForCausalLM

from benchmarks.common import alternate, write_results
from ponder_lightning.models import VanillaLM
from ponder_lightning.nn.hf import save_hf_backbone


def train_step(loss_fn, optimizer) -> callable:
    def step() -> None:
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def compare(size: str, batch: int, seq_len: int, repeats: int) -> dict:
    torch.manual_seed(0)
    ours = VanillaLM(size=size)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_backbone(ours.backbone, tmp)
        theirs = GPTNeoXForCausalLM.from_pretrained(tmp, attn_implementation="sdpa")
    ours.train(), theirs.train()
    tokens = torch.randint(0, 50277, (batch, seq_len + 1))
    contenders = {
        "ours": train_step(lambda: ours.training_loss(tokens)[0], torch.optim.AdamW(ours.parameters(), lr=1e-4)),
        "transformers": train_step(
            lambda: theirs(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss, torch.optim.AdamW(theirs.parameters(), lr=1e-4)
        ),
    }
    seconds = alternate(contenders, repeats)
    n_tokens = batch * seq_len
    return {
        "size": size,
        "batch x seq": f"{batch}x{seq_len}",
        "ours tok/s": n_tokens / seconds["ours"],
        "transformers tok/s": n_tokens / seconds["transformers"],
        "ratio ours/transformers": seconds["transformers"] / seconds["ours"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["pythia-14m", "pythia-70m"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = [compare(size, args.batch, args.seq_len, args.repeats) for size in args.sizes]
    write_results("train_throughput", rows, list(rows[0]))


if __name__ == "__main__":
    main()
