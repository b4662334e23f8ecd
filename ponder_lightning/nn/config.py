"""Backbone hyper-parameters and the named Pythia presets.

One dataclass describes every backbone; presets are plain dictionaries so that a YAML overlay can
pick a size by name (`size: pythia-70m`) and still override single fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from ponder_lightning.errors import UserError

VOCAB_MULTIPLE = 128
PYTHIA_VOCAB = 50304

BlockType = Literal["neox", "llama"]


def pad_vocab(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Round a tokenizer's vocabulary up to a multiple of 128, as Pythia does (50277 -> 50304)."""
    return ((n + multiple - 1) // multiple) * multiple


@dataclass
class BackboneConfig:
    """Shape of a GPT-NeoX (Pythia) or LLaMA-style decoder (`block`). Defaults are pythia-70m.

    `mlp_ratio`: MLP hidden width / d_model (a float so that LLaMA's SwiGLU width fits: the
    PonderLM-2/3 authors' LLaMA configs use 43/16 = 2.6875, about 8/3, so that SwiGLU's three
    matrices cost what GELU's two cost at 4).
    """

    n_layer: int = 6
    d_model: int = 512
    n_head: int = 8
    vocab_size: int = PYTHIA_VOCAB
    max_seq_len: int = 2048
    block: BlockType = "neox"
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    norm_eps: float = 1e-5
    mlp_ratio: float = 4

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise UserError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}: "
                "pick sizes with d_model % n_head == 0"
            )
        if self.block not in ("neox", "llama"):
            raise UserError(f"unknown block type {self.block!r}: use 'neox' or 'llama'")
        if self.rotary_dims % 2:
            raise UserError(
                f"rotary_pct={self.rotary_pct} gives an odd number of rotary dims ({self.rotary_dims}) per head: "
                "choose rotary_pct so that head_dim*rotary_pct is even"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def d_ff(self) -> int:
        return round(self.mlp_ratio * self.d_model)


PRESETS: dict[str, dict[str, Any]] = {
    # A model small enough for unit tests on a 2-core CPU.
    "tiny": dict(n_layer=2, d_model=64, n_head=4, max_seq_len=512),
    "pythia-14m": dict(n_layer=6, d_model=128, n_head=4),
    "pythia-70m": dict(n_layer=6, d_model=512, n_head=8),
    "pythia-160m": dict(n_layer=12, d_model=768, n_head=12),
    "pythia-410m": dict(n_layer=24, d_model=1024, n_head=16),
    "pythia-1b": dict(n_layer=16, d_model=2048, n_head=8),
    "pythia-1.4b": dict(n_layer=24, d_model=2048, n_head=16),
    "pythia-2.8b": dict(n_layer=32, d_model=2560, n_head=32),
}

# LLaMA-style block (RMSNorm, SwiGLU, full rotary, no biases), vocab 50304 with the Pythia
# tokenizer. 125m..2.8b are the PonderLM-2/3 authors' LLaMA configs (PonderLM-3: llama-410m);
# tiny/14m/70m take the Pythia shapes for CPU runs.
LLAMA = dict(block="llama", rotary_pct=1.0, mlp_ratio=2.6875)
PRESETS |= {
    "llama-tiny": dict(PRESETS["tiny"], **LLAMA),
    "llama-14m": dict(PRESETS["pythia-14m"], **LLAMA),
    "llama-70m": dict(PRESETS["pythia-70m"], **LLAMA),
    "llama-125m": dict(n_layer=12, d_model=768, n_head=12, **LLAMA),
    "llama-410m": dict(n_layer=24, d_model=1024, n_head=16, **LLAMA),
    "llama-834m": dict(n_layer=24, d_model=1536, n_head=24, **LLAMA),
    "llama-1.4b": dict(n_layer=24, d_model=2048, n_head=32, **LLAMA),
    "llama-2.8b": dict(n_layer=48, d_model=2048, n_head=32, **LLAMA),
}


def backbone_config(size: str, **overrides: Any) -> BackboneConfig:
    """Build a config from a preset name; `None` overrides keep the preset's value."""
    if size not in PRESETS:
        raise UserError(f"unknown model size {size!r}: choose one of {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(BackboneConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise UserError(f"unknown backbone field(s) {sorted(unknown)}: valid fields are {sorted(fields)}")
    values = {**PRESETS[size], **{k: v for k, v in overrides.items() if v is not None}}
    return BackboneConfig(**values)
