"""Checkpoints in and out: every file this library reads or writes a model as, in one package.

One entry each way:
- `load_checkpoint(path)`: a model (eval mode, CPU) and its run's data settings from a Lightning
  checkpoint (`last.ckpt`, or an FSDP directory of shards), a directory `export` wrote (either
  format), a PonderLM authors' GPT-NeoX directory, or a plain Hugging Face GPT-NeoX/LLaMA one;
- `export_model(model, out, format=...)`: the model as a Hugging Face directory (`backbone`: a plain
  GPT-NeoX/LLaMA checkpoint plus this library's files; `transformers`: the whole model for
  `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`).

The modules, in the package's layers (tests/test_layering.py): below the models, what a model's
own `pretrained=` start and a resume read — `formats` (file and field names of every format,
readers of starting weights), `safe` (reading without running a pickle's code), `compat` (what
a checkpoint must agree on with a config, and what a resume may change); above them, what builds
or writes a whole model — `load`, `export`, and `hf_modeling` (the transformers class an export
ships). The networks' own state-dict layout (Hugging Face names <-> the backbone's) is
`nn.hf`'s, since `nn` imports nothing of the floors above it.

The entries are imported on first use, so that the models can read `formats`, `safe` and
`compat` without importing the modules that import the models.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_model", "load_checkpoint"]


def __getattr__(name: str) -> Any:
    if name == "load_checkpoint":
        from ponder_lightning.io.load import load_checkpoint

        return load_checkpoint
    if name == "export_model":  # (not `export`: that is the module, an attribute once imported)
        from ponder_lightning.io.export import export_model

        return export_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
