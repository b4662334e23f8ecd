"""What a `pretrained` directory holds: readers of this library's transformers exports, the
PonderLM authors' directories and plain Hugging Face directories; no model code.

The models read their starting weights here (`pretrained=DIR`): `pretrained_backbone_state`,
`pretrained_extra_state`, `pretrained_scales_embeddings`. The names of the files and fields of
both export formats live here too, so that the writer (`ponder_lightning.io.export`) and the
reader (`ponder_lightning.io.load`) share one spelling:

- `export --format transformers`: config.json with `model_type` MODEL_TYPE, the whole state dict
  in WEIGHTS_FILE under PREFIX;
- `export --format backbone` (the default): a plain GPT-NeoX/LLaMA directory plus EXPORT_CONFIG
  and, for the parameters outside the backbone, EXPORT_EXTRA_WEIGHTS;
- the PonderLM authors' training code: a GPT-NeoX config.json with AUTHORS_FLAG set.

Below the models in the package's layers (see tests/test_layering.py): of this package it
imports only `nn`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

# -- `export --format transformers` ---------------------------------------------------------------
MODEL_TYPE = "ponder_lightning"
WEIGHTS_FILE = "model.safetensors"
PREFIX = "model."  # PonderLightningForCausalLM keeps the LightningModule under `self.model`

# -- `export --format backbone` -------------------------------------------------------------------
EXPORT_CONFIG = "ponder_lightning_config.json"
EXPORT_EXTRA_WEIGHTS = "ponder_lightning.safetensors"
EXPORT_FORMAT = "ponder_lightning.export"

# -- the PonderLM authors' checkpoints ------------------------------------------------------------
#: config.json fields the authors' training code (LUMIA-Group/PonderingLM) sets on a GPT-NeoX config.
AUTHORS_FLAG = "ponderinglm"
#: Parameters of their GPTNeoXForCausalLM that the pondering forward does not use.
AUTHORS_UNUSED = ("adapter.weight",)


def is_transformers_export(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def is_ponderlm_authors_dir(path: Path) -> bool:
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return raw.get("model_type") == "gpt_neox" and bool(raw.get(AUTHORS_FLAG))


# -- `pretrained`: a start for continued pretraining ----------------------------------------------
def pretrained_backbone_state(path: str | Path) -> dict[str, Any] | None:
    """The backbone's weights (backbone names) of a directory that is not a plain Hugging Face
    backbone: a transformers export of this library, or the PonderLM authors' GPT-NeoX directory
    (without their unused adapter). None for a plain GPT-NeoX/LLaMA directory (Pythia)."""
    from ponder_lightning.nn.hf import load_hf_state_dict

    directory = Path(path).expanduser()
    if is_transformers_export(directory):
        head = PREFIX + "backbone."
        return {
            k.removeprefix(head): v for k, v in load_file(str(directory / WEIGHTS_FILE)).items() if k.startswith(head)
        }
    if is_ponderlm_authors_dir(directory):
        return {k: v for k, v in load_hf_state_dict(directory).items() if k not in AUTHORS_UNUSED}
    return None


def pretrained_extra_state(path: str | Path, class_path: str) -> dict[str, Any]:
    """The weights outside the backbone (gates, routers) of a transformers export of the same
    model class; empty otherwise (a different class keeps its own initialisation)."""
    directory = Path(path).expanduser()
    if (
        not is_transformers_export(directory)
        or json.loads((directory / "config.json").read_text()).get("class_path") != class_path
    ):
        return {}
    return {
        k.removeprefix(PREFIX): v
        for k, v in load_file(str(directory / WEIGHTS_FILE)).items()
        if not k.startswith(PREFIX + "backbone.")
    }


def pretrained_scales_embeddings(path: str | Path) -> bool:
    """The embedding scale the weights at `path` were trained with: an export's own setting
    (either format), the authors' config's `scale_embeds`, and none for a plain Hugging Face
    directory (Pythia)."""
    directory = Path(path).expanduser()
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if (directory / EXPORT_CONFIG).is_file():  # `export --format backbone` of a model of this library
        recorded = json.loads((directory / EXPORT_CONFIG).read_text()).get("init_args", {})
        return bool(recorded.get("scale_embeds", False))
    if raw.get("model_type") == MODEL_TYPE:
        return bool(raw.get("init_args", {}).get("scale_embeds", False))
    return bool(raw.get("scale_embeds", False)) if raw.get(AUTHORS_FLAG) else False
