"""Load and save the backbone in the Hugging Face GPT-NeoX layout (config.json + safetensors).

Our module names equal transformers' minus the `gpt_neox.` prefix, so conversion is a rename.
Only local directories are read: a hub name must be downloaded by the user first (offline CI and
clusters without internet are the normal case for this library).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ponder_lightning.errors import UserError
from ponder_lightning.nn.backbone import Backbone
from ponder_lightning.nn.config import BackboneConfig

_PREFIX = "gpt_neox."
# Buffers that older transformers versions stored in Pythia checkpoints; we recompute them.
_IGNORED_SUFFIXES = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")


def _require_dir(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(
            f"pretrained checkpoint {str(path)!r} is not a local directory: download it first "
            f"(e.g. `huggingface-cli download EleutherAI/pythia-70m --local-dir ...`) and pass that path"
        )
    if not (p / "config.json").is_file():
        raise UserError(f"{p} has no config.json: point at a Hugging Face GPT-NeoX checkpoint directory")
    return p


def read_hf_config(path: str | Path) -> BackboneConfig:
    """Translate a GPT-NeoX config.json into a BackboneConfig (refusing layouts we do not implement)."""
    raw = json.loads((_require_dir(path) / "config.json").read_text())
    if raw.get("model_type") != "gpt_neox":
        raise UserError(f"{path}/config.json has model_type={raw.get('model_type')!r}; only 'gpt_neox' checkpoints load here")
    if not raw.get("use_parallel_residual", True) or raw.get("hidden_act", "gelu") != "gelu":
        raise UserError(f"{path}/config.json uses a GPT-NeoX variant (sequential residual or non-GELU) that this backbone does not implement")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    d_model, n_head = raw["hidden_size"], raw["num_attention_heads"]
    mlp_ratio, rest = divmod(raw.get("intermediate_size", 4 * d_model), d_model)
    if rest:
        raise UserError(f"{path}/config.json: intermediate_size is not a multiple of hidden_size")
    return BackboneConfig(
        n_layer=raw["num_hidden_layers"],
        d_model=d_model,
        n_head=n_head,
        vocab_size=raw["vocab_size"],
        max_seq_len=raw.get("max_position_embeddings", 2048),
        rotary_pct=rope.get("partial_rotary_factor", raw.get("rotary_pct", 0.25)),
        rotary_base=rope.get("rope_theta", raw.get("rotary_emb_base", 10000.0)),
        norm_eps=raw.get("layer_norm_eps", 1e-5),
        mlp_ratio=mlp_ratio,
    )


def _read_weights(p: Path) -> dict[str, Tensor]:
    index = p / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for f in files for k, v in load_file(str(p / f)).items()}
    if (p / "model.safetensors").is_file():
        return load_file(str(p / "model.safetensors"))
    if (p / "pytorch_model.bin").is_file():
        return torch.load(p / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise UserError(f"{p} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def load_hf_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Backbone state dict (our names) from a local GPT-NeoX checkpoint directory."""
    weights = _read_weights(_require_dir(path))
    return {
        k.removeprefix(_PREFIX): v
        for k, v in weights.items()
        if not k.endswith(_IGNORED_SUFFIXES)
    }


def load_hf_backbone(path: str | Path) -> Backbone:
    backbone = Backbone(read_hf_config(path))
    load_into(backbone, load_hf_state_dict(path), source=str(path))
    return backbone


def load_into(backbone: Backbone, state: dict[str, Tensor], source: str) -> None:
    """Copy weights into an existing backbone, with one clear error for any shape or name mismatch."""
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"checkpoint {source} does not match the backbone: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise UserError(
                f"checkpoint {source}: {name} has shape {tuple(tensor.shape)} but the model expects {tuple(own[name].shape)} "
                f"(check size/vocab_size against the checkpoint's config.json)"
            )
    backbone.load_state_dict(state)


def hf_config_dict(cfg: BackboneConfig, **extra: object) -> dict[str, object]:
    """config.json contents that transformers' GPTNeoXForCausalLM reads back to the same model."""
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "intermediate_size": cfg.d_ff,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rotary_pct": cfg.rotary_pct,
        "rotary_emb_base": cfg.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base, "partial_rotary_factor": cfg.rotary_pct},
        "layer_norm_eps": cfg.norm_eps,
        "hidden_act": "gelu",
        "use_parallel_residual": True,
        "tie_word_embeddings": False,
        "attention_bias": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "float32",
        **extra,
    }


def save_hf_backbone(backbone: Backbone, path: str | Path, **extra_config: object) -> Path:
    """Write config.json + model.safetensors that `GPTNeoXForCausalLM.from_pretrained` loads."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        (k if k.startswith("embed_out") else _PREFIX + k): v.detach().contiguous().cpu()
        for k, v in backbone.state_dict().items()
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config_dict(backbone.config, **extra_config), indent=2))
    return out
