"""Load and save the backbone in the Hugging Face GPT-NeoX layout (config.json + safetensors),
or in the LLaMA layout for the LLaMA-style block.

Our module names equal transformers' minus the `gpt_neox.` prefix, so conversion is a rename;
LLaMA's differ only in the top-level names (`_LLAMA_NAMES`).
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
# (transformers' LlamaForCausalLM prefix, ours); inside a layer the names are the same.
_LLAMA_NAMES = (
    ("model.embed_tokens.", "embed_in."),
    ("model.norm.", "final_layer_norm."),
    ("lm_head.", "embed_out."),
    ("model.layers.", "layers."),
)


def _our_name(hf_name: str) -> str:
    for theirs, ours in _LLAMA_NAMES:
        if hf_name.startswith(theirs):
            return ours + hf_name.removeprefix(theirs)
    return hf_name.removeprefix(_PREFIX)


def _hf_name(name: str, block: str) -> str:
    if block == "llama":
        return next(theirs + name.removeprefix(ours) for theirs, ours in _LLAMA_NAMES if name.startswith(ours))
    return name if name.startswith("embed_out") else _PREFIX + name


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


def rope_type(rope: dict) -> str:
    """The rotary scaling a config asks for (`rope_type`, or `type` in older configs)."""
    return rope.get("rope_type", rope.get("type", "default"))


def read_hf_config(path: str | Path) -> BackboneConfig:
    """Translate a GPT-NeoX config.json into a BackboneConfig (refusing layouts we do not implement)."""
    raw = json.loads((_require_dir(path) / "config.json").read_text())
    if raw.get("model_type") == "llama":
        return _read_llama_config(raw, path)
    if raw.get("model_type") != "gpt_neox":
        raise UserError(
            f"{path}/config.json has model_type={raw.get('model_type')!r}; "
            "only 'gpt_neox' and 'llama' checkpoints load here"
        )
    if not raw.get("use_parallel_residual", True) or raw.get("hidden_act", "gelu") != "gelu":
        raise UserError(
            f"{path}/config.json uses a GPT-NeoX variant (sequential residual or non-GELU) "
            "that this backbone does not implement"
        )
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope_type(rope) != "default":
        raise UserError(
            f"{path}/config.json scales its rotary embeddings (rope type {rope_type(rope)!r}), which this backbone "
            "does not implement: its logits would be wrong"
        )
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


def _read_llama_config(raw: dict, path: str | Path) -> BackboneConfig:
    """A LLaMA config.json as a BackboneConfig with block='llama' (plain multi-head attention,
    untied, no biases, unscaled rotary: the variants our LLaMA block implements)."""
    d_model, n_head = raw["hidden_size"], raw["num_attention_heads"]
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    unsupported = {
        "grouped-query attention": raw.get("num_key_value_heads", n_head) != n_head,
        "a head_dim other than hidden_size / heads": raw.get("head_dim", d_model // n_head) != d_model // n_head,
        "biases": raw.get("attention_bias", False) or raw.get("mlp_bias", False),
        "tied embeddings": raw.get("tie_word_embeddings", False),
        f"hidden_act={raw.get('hidden_act')!r}": raw.get("hidden_act", "silu") != "silu",
        f"rope type {rope_type(rope)!r}": rope_type(rope) != "default",
    }
    found = [name for name, present in unsupported.items() if present]
    if found:
        raise UserError(f"{path}/config.json uses LLaMA variants this backbone does not implement: {', '.join(found)}")
    cfg = BackboneConfig(
        n_layer=raw["num_hidden_layers"],
        d_model=d_model,
        n_head=n_head,
        vocab_size=raw["vocab_size"],
        max_seq_len=raw.get("max_position_embeddings", 2048),
        block="llama",
        rotary_pct=1.0,
        rotary_base=rope.get("rope_theta", raw.get("rope_theta", 10000.0)),
        norm_eps=raw.get("rms_norm_eps", 1e-6),
        mlp_ratio=raw["intermediate_size"] / d_model,
    )
    if cfg.d_ff != raw["intermediate_size"]:
        raise UserError(
            f"{path}/config.json: intermediate_size={raw['intermediate_size']} "
            "is not representable as a width ratio of hidden_size"
        )
    return cfg


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
    """Backbone state dict (our names) from a local GPT-NeoX or LLaMA checkpoint directory."""
    weights = _read_weights(_require_dir(path))
    return {_our_name(k): v for k, v in weights.items() if not k.endswith(_IGNORED_SUFFIXES)}


def load_hf_backbone(path: str | Path) -> Backbone:
    backbone = Backbone(read_hf_config(path))
    load_into(backbone, load_hf_state_dict(path), source=str(path))
    return backbone


_SHAPE_FIELDS = ("block", "n_layer", "d_model", "n_head", "mlp_ratio", "rotary_pct", "rotary_base", "norm_eps")


def load_pretrained(backbone: Backbone, path: str | Path, state: dict[str, Tensor] | None = None) -> None:
    """Load a local GPT-NeoX checkpoint into an existing backbone (continued pretraining).

    The backbone's shape comes from the model's own config (`size` + overrides), so that a
    checkpoint of the continued run rebuilds without the pretrained directory; this checks that
    the two agree and says which preset to pick when they do not. `state`: the backbone's weights
    when the directory holds more than a plain backbone (the caller extracts them; each tensor's
    shape is still checked).
    """
    from ponder_lightning.nn.config import PRESETS, backbone_config

    if state is not None:
        load_into(backbone, state, source=str(path))
        return

    theirs, ours = read_hf_config(path), backbone.config
    if theirs.vocab_size != ours.vocab_size:
        raise UserError(
            f"pretrained {path} has vocab_size={theirs.vocab_size} but the model has {ours.vocab_size} (the "
            "tokenizer's vocabulary padded to a multiple of 128): use the checkpoint's tokenizer (--data.tokenizer "
            f"neox for Pythia) or set model.init_args.vocab_size={theirs.vocab_size}"
        )
    diff = [
        f"{f}={getattr(theirs, f)} (model: {getattr(ours, f)})"
        for f in _SHAPE_FIELDS
        if getattr(theirs, f) != getattr(ours, f)
    ]
    if diff:
        shape = ("block", "n_layer", "d_model", "n_head")  # pythia-410m and llama-410m share their shape
        preset = next(
            (name for name in PRESETS if all(getattr(backbone_config(name), k) == getattr(theirs, k) for k in shape)),
            None,
        )
        hint = f"set model.init_args.size={preset}" if preset else "set model.init_args.n_layer/d_model/n_head to match"
        raise UserError(f"pretrained {path} does not match the configured backbone: {', '.join(diff)}: {hint}")
    load_into(backbone, load_hf_state_dict(path), source=str(path))


def load_into(backbone: Backbone, state: dict[str, Tensor], source: str) -> None:
    """Copy weights into an existing backbone, with one clear error for any shape or name mismatch."""
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(
            f"checkpoint {source} does not match the backbone: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise UserError(
                f"checkpoint {source}: {name} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(own[name].shape)} (check size/vocab_size against the checkpoint's config.json)"
            )
    backbone.load_state_dict(state)


def hf_config_dict(cfg: BackboneConfig, **extra: object) -> dict[str, object]:
    """config.json contents that transformers' GPTNeoXForCausalLM (LlamaForCausalLM for the LLaMA
    block) reads back to the same model."""
    if cfg.block == "llama":
        return _llama_config_dict(cfg, **extra)
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
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": cfg.rotary_base,
            "partial_rotary_factor": cfg.rotary_pct,
        },
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


def _llama_config_dict(cfg: BackboneConfig, **extra: object) -> dict[str, object]:
    if cfg.rotary_pct != 1.0:
        raise UserError(f"a LLaMA checkpoint has full rotary embeddings; this backbone has rotary_pct={cfg.rotary_pct}")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,
        "intermediate_size": cfg.d_ff,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "float32",
        **extra,
    }


def save_hf_backbone(backbone: Backbone, path: str | Path, **extra_config: object) -> Path:
    """Write config.json + model.safetensors that `GPTNeoXForCausalLM.from_pretrained` loads
    (`LlamaForCausalLM.from_pretrained` for the LLaMA block)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    block = backbone.config.block
    state = {_hf_name(k, block): v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config_dict(backbone.config, **extra_config), indent=2))
    return out
