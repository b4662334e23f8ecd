"""Training throughput: our vanilla model vs transformers' GPTNeoXForCausalLM, same weights.

One fwd + bwd + AdamW step, batch 8 x seq 256, pythia-14m and pythia-70m shapes with the Pythia
vocabulary (50304); CPU fp32 by default. Both models run in this process, timed in alternation;
the table shows tokens/s and the ratio ours / transformers. On a GPU (`--device cuda --bf16`, bf16
autocast as `precision: bf16-mixed` trains) it adds each model's MFU: model FLOPs per second
(6 x parameters + attention, `ponder_lightning.flops`) over the chip's dense bf16 peak.

    python -m benchmarks.train_throughput [--repeats 5] [--sizes pythia-14m pythia-70m] [--ponder]
    python -m benchmarks.train_throughput --device cuda --bf16 --sizes pythia-160m pythia-410m --batch 16 --seq_len 2048
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.throughput import get_available_flops
from transformers import GPTNeoXForCausalLM

from benchmarks.common import alternate, write_results
from ponder_lightning import flops
from ponder_lightning.models import PonderLM, VanillaLM
from ponder_lightning.nn.hf import save_hf_backbone


def train_step(loss_fn, optimizer, bf16: bool) -> callable:
    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def peak_flops(device: torch.device, bf16: bool, override_tflops: float | None) -> float | None:
    """The chip's dense peak: `--peak_tflops` if given, else Lightning's table (None on CPUs and
    on chips it does not list)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    return get_available_flops(device, torch.bfloat16 if bf16 else torch.float32) if device.type == "cuda" else None


def compare(
    size: str, batch: int, seq_len: int, repeats: int, device: torch.device, bf16: bool, peak: float | None
) -> dict:
    torch.manual_seed(0)
    ours = VanillaLM(size=size)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_backbone(ours.backbone, tmp)
        theirs = GPTNeoXForCausalLM.from_pretrained(tmp, attn_implementation="sdpa")
    ours.to(device).train(), theirs.to(device).train()
    tokens = torch.randint(0, 50277, (batch, seq_len + 1), device=device)
    contenders = {
        "ours": train_step(lambda: ours.training_loss(tokens)[0], torch.optim.AdamW(ours.parameters(), lr=1e-4), bf16),
        "transformers": train_step(
            lambda: theirs(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss,
            torch.optim.AdamW(theirs.parameters(), lr=1e-4),
            bf16,
        ),
    }
    seconds = alternate(contenders, repeats)
    n_tokens = batch * seq_len
    row = {
        "size": size,
        "batch x seq": f"{batch}x{seq_len}",
        "ours tok/s": n_tokens / seconds["ours"],
        "transformers tok/s": n_tokens / seconds["transformers"],
        "ratio ours/transformers": seconds["transformers"] / seconds["ours"],
    }
    if peak is not None:
        step_flops = flops.training_flops(flops.vanilla_forward_flops(ours.config, seq_len)) * n_tokens
        row["ours MFU"] = step_flops / seconds["ours"] / peak
        row["transformers MFU"] = step_flops / seconds["transformers"] / peak
    return row


def authors_ponder_loss(model: GPTNeoXForCausalLM, tokens: torch.Tensor, pondering_steps: int) -> torch.Tensor:
    """The PonderLM authors' algorithm on transformers' model (LUMIA-Group/PonderingLM, full
    vocabulary, no embedding scale): embeddings in; s times: hidden states, LM head, softmax, and
    the probability-weighted embedding added to the input; then the final pass and its loss."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    embeds = embed(inputs)
    for _ in range(pondering_steps):
        hidden = model.gpt_neox(inputs_embeds=embeds).last_hidden_state
        embeds = embeds + head(hidden).softmax(dim=-1) @ embed.weight
    logits = head(model.gpt_neox(inputs_embeds=embeds).last_hidden_state)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def compare_ponder(size: str, batch: int, seq_len: int, repeats: int, device: torch.device, bf16: bool) -> dict:
    """PonderLM (3 pondering steps, full-vocabulary mixture) vs the authors' algorithm run on
    transformers' GPTNeoXForCausalLM with the same weights; the losses must agree first."""
    torch.manual_seed(0)
    ours = PonderLM(size=size, vocab_size=50304, scale_embeds=False)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_backbone(ours.backbone, tmp)
        theirs = GPTNeoXForCausalLM.from_pretrained(tmp, attn_implementation="sdpa")
    ours.to(device).train(), theirs.to(device).train()
    tokens = torch.randint(0, 50277, (batch, seq_len + 1), device=device)
    with torch.no_grad():
        gap = abs(ours.training_loss(tokens)[0].item() - authors_ponder_loss(theirs, tokens, 3).item())
    assert gap < 1e-3, f"the two implementations disagree: loss gap {gap}"
    contenders = {
        "ours": train_step(lambda: ours.training_loss(tokens)[0], torch.optim.AdamW(ours.parameters(), lr=1e-4), bf16),
        "transformers": train_step(
            lambda: authors_ponder_loss(theirs, tokens, 3), torch.optim.AdamW(theirs.parameters(), lr=1e-4), bf16
        ),
    }
    seconds = alternate(contenders, repeats)
    n_tokens = batch * seq_len
    return {
        "size": f"{size} PonderLM (s=3)",
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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU), as precision: bf16-mixed")
    parser.add_argument(
        "--ponder", action="store_true", help="add PonderLM vs the authors' algorithm on transformers (first size)"
    )
    parser.add_argument(
        "--peak_tflops", type=float, default=None, help="the chip's dense peak, for chips Lightning does not list"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    peak = peak_flops(device, args.bf16, args.peak_tflops)
    rows = [compare(size, args.batch, args.seq_len, args.repeats, device, args.bf16, peak) for size in args.sizes]
    columns = list(rows[0])
    if args.ponder:
        rows.append(compare_ponder(args.sizes[0], args.batch, args.seq_len, args.repeats, device, args.bf16))
    write_results("train_throughput", rows, columns)


if __name__ == "__main__":
    main()
