"""Export a trained model as a transformers model with remote code, and read such a directory back.

`export_transformers(model, out, tokenizer, global_step)` writes:
- `config.json`: `model_type: ponder_lightning`, the model's class path and init arguments, the
  step it was trained to, `auto_map` naming the two classes of `modeling_ponder_lightning.py`;
- `model.safetensors`: the model's whole state dict (backbone, gates, routers) under `model.`;
- `modeling_ponder_lightning.py`: a copy of `ponder_lightning/hf_modeling.py`, a thin
  `PreTrainedModel` that imports the installed package and rebuilds the model (see its docstring
  for why the recurrence is imported rather than copied);
- `generation_config.json`: EOS, no cache, and the padded vocabulary's ids beyond the tokenizer
  suppressed (as `ponder_lightning.generate` does);
- the tokenizer (`tokenizer.json` + `tokenizer_config.json`) for `neox`, `bpe4k`, `bytes` or a
  local tokenizer file/directory, so that `AutoTokenizer.from_pretrained(out)` works.

`load_transformers_dir(path)` rebuilds the model from such a directory without transformers
(`load_checkpoint` calls it). `load_ponderlm_authors_dir(path)` reads a GPT-NeoX directory saved
by the PonderLM authors' training code (config fields `ponderinglm`, `pondering_steps`,
`scale_embeds`, `mutiply_pondering_steps`) as a PonderLM.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from ponder_lightning.errors import UserError

MODEL_TYPE = "ponder_lightning"
MODELING_FILE = "modeling_ponder_lightning.py"
WEIGHTS_FILE = "model.safetensors"
PREFIX = "model."  # PonderLightningForCausalLM keeps the LightningModule under `self.model`
EOS_TEXT = "<|endoftext|>"
BUILTIN_TOKENIZERS = ("neox", "gpt-neox-20b", "pythia", "bpe4k", "bytes")


def export_transformers(model, out: str | Path, tokenizer: str | None = None, global_step: int = 0) -> Path:
    """Write `model` (any CausalLMModule) as a transformers directory (see the module docstring)."""
    from ponder_lightning import __version__
    from ponder_lightning.models.checkpoint import _BUILD_ONLY_ARGS, _jsonable

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tokenizer_vocab, eos = _tokenizer_facts(tokenizer)
    init_args = {k: v for k, v in dict(model.hparams).items() if not k.startswith("_") and k not in _BUILD_ONLY_ARGS}
    dtype = str(model.backbone.embed_in.weight.dtype).removeprefix("torch.")
    config = {
        "architectures": ["PonderLightningForCausalLM"],
        "model_type": MODEL_TYPE,
        "auto_map": {
            "AutoConfig": f"{MODELING_FILE[:-3]}.PonderLightningConfig",
            "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.PonderLightningForCausalLM",
        },
        "class_path": f"{type(model).__module__}.{type(model).__qualname__}",
        "init_args": _jsonable(init_args),
        "global_step": int(global_step),
        "tokenizer": tokenizer,
        "n_iterations": int(model.n_iterations),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": False,
        "use_cache": False,
        "torch_dtype": dtype,
        "ponder_lightning_version": __version__,
        **({"bos_token_id": eos, "eos_token_id": eos} if eos is not None else {}),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {PREFIX + k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    shutil.copyfile(Path(__file__).with_name("hf_modeling.py"), out / MODELING_FILE)
    generation = {"use_cache": False, "do_sample": False}
    if eos is not None:
        generation.update(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    if tokenizer_vocab is not None and tokenizer_vocab < cfg.vocab_size:
        generation["suppress_tokens"] = list(range(tokenizer_vocab, cfg.vocab_size))
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for stale in ("ponder_lightning_config.json", "ponder_lightning.safetensors"):  # a previous `--format backbone` export
        (out / stale).unlink(missing_ok=True)
    if tokenizer is not None:
        write_tokenizer(tokenizer, out, cfg.max_seq_len)
    return out


def _tokenizer_facts(spec: str | None) -> tuple[int | None, int | None]:
    """(ids the tokenizer emits, its EOS id), or (None, None) without a tokenizer."""
    if spec is None:
        return None, None
    from ponder_lightning.data import load_tokenizer

    try:
        tok = load_tokenizer(spec)
    except UserError:  # e.g. a hub name while offline: export without the generation facts
        return None, None
    return tok.vocab_size, tok.eos_id


def write_tokenizer(spec: str, out: Path, max_len: int) -> None:
    """Tokenizer files transformers' `AutoTokenizer` loads, giving the ids of `load_tokenizer(spec)`."""
    from ponder_lightning.data.tokenizer import BPE4K_ALIASES, KNOWN_EOS_TOKENS, NEOX_ALIASES, VENDORED_BPE4K, VENDORED_NEOX

    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len}
    path = Path(spec).expanduser()
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
            if (path / name).is_file():
                shutil.copyfile(path / name, out / name)
        return
    if path.is_file():
        shutil.copyfile(path, out / "tokenizer.json")
        vocab = json.loads(path.read_text()).get("added_tokens", [])
        eos = next((t for t in KNOWN_EOS_TOKENS if any(a.get("content") == t for a in vocab)), EOS_TEXT)
    elif spec.lower() in NEOX_ALIASES:
        shutil.copyfile(VENDORED_NEOX, out / "tokenizer.json")
        config["tokenizer_class"], eos = "GPTNeoXTokenizer", EOS_TEXT
    elif spec.lower() in BPE4K_ALIASES:
        shutil.copyfile(VENDORED_BPE4K, out / "tokenizer.json")
        eos = EOS_TEXT
    elif spec.lower() == "bytes":
        _byte_tokenizer().save(str(out / "tokenizer.json"))
        eos = EOS_TEXT
    else:
        return  # a hub name: the user has it (and online) already
    config.update(bos_token=eos, eos_token=eos, unk_token=eos, pad_token=eos)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _byte_tokenizer():
    """The `bytes` tokenizer (UTF-8 bytes as ids 0..255, EOS 256) as a `tokenizers` tokenizer: a
    byte-level BPE with the 256 byte symbols and no merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    byte_to_char = _bytes_to_unicode()
    assert sorted(alphabet) == sorted(byte_to_char.values())
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TEXT, special=True, normalized=False)])
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the one ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def is_transformers_export(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def load_transformers_dir(path: Path):
    """(model, data) from a directory written by `export_transformers`, as `load_checkpoint` returns them."""
    from ponder_lightning.models.checkpoint import LoadedCheckpoint, _load_state, build_model

    meta = json.loads((path / "config.json").read_text())
    if not meta.get("class_path"):
        raise UserError(f"{path}/config.json has model_type {MODEL_TYPE} but no class_path: it was not written by this library's export")
    model = build_model({"_class_path": meta["class_path"], **meta.get("init_args", {})}, source=str(path / "config.json"))
    if not (path / WEIGHTS_FILE).is_file():
        raise UserError(f"{path} has no {WEIGHTS_FILE}")
    state = load_file(str(path / WEIGHTS_FILE))
    _load_state(model, {k.removeprefix(PREFIX): v for k, v in state.items()}, str(path))
    step = int(meta.get("global_step", 0))
    model.on_load_checkpoint({"global_step": step})
    data: dict[str, Any] = {"global_step": step}
    tokenizer = meta.get("tokenizer")
    if tokenizer is not None and str(tokenizer).lower() in BUILTIN_TOKENIZERS:
        data["tokenizer"] = tokenizer  # the library's own ids (`bytes` keeps its text-only EOS rule)
    elif (path / "tokenizer.json").is_file():
        data["tokenizer"] = str(path)  # the copy written next to the weights
    return LoadedCheckpoint(model.eval(), data)


# -- the PonderLM authors' checkpoints ------------------------------------------------------------
#: config.json fields the authors' training code (LUMIA-Group/PonderingLM) sets on a GPT-NeoX config.
AUTHORS_FLAG = "ponderinglm"
#: Parameters of their GPTNeoXForCausalLM that the pondering forward does not use.
AUTHORS_UNUSED = ("adapter.weight",)


def is_ponderlm_authors_dir(path: Path) -> bool:
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return raw.get("model_type") == "gpt_neox" and bool(raw.get(AUTHORS_FLAG))


def load_ponderlm_authors_dir(path: Path):
    """A PonderLM from a GPT-NeoX directory saved by the PonderLM authors' code: the backbone's
    weights, `pondering_steps`, `scale_embeds` and `mutiply_pondering_steps` from config.json,
    the full-vocabulary mixture (their forward's `use_topk=False`)."""
    from ponder_lightning.models.checkpoint import LoadedCheckpoint, _preset_for
    from ponder_lightning.models.ponder import PonderLM
    from ponder_lightning.nn.hf import load_into, load_hf_state_dict, read_hf_config

    raw = json.loads((path / "config.json").read_text())
    cfg = read_hf_config(path)
    model = PonderLM(
        size=_preset_for(cfg, path), n_layer=cfg.n_layer, d_model=cfg.d_model, n_head=cfg.n_head, vocab_size=cfg.vocab_size,
        max_seq_len=cfg.max_seq_len, pondering_steps=int(raw.get("pondering_steps", 3)), scale_embeds=bool(raw.get("scale_embeds", False)),
        multiply_pondering_steps=bool(raw.get("mutiply_pondering_steps", raw.get("multiply_pondering_steps", False))),
    )
    state = {k: v for k, v in load_hf_state_dict(path).items() if k not in AUTHORS_UNUSED}
    load_into(model.backbone, state, source=str(path))
    tokenizer = {"tokenizer": str(path)} if (path / "tokenizer.json").is_file() else {}
    return LoadedCheckpoint(model.eval(), {"global_step": 0, **tokenizer})


# -- `pretrained`: a start for continued pretraining ----------------------------------------------
def pretrained_backbone_state(path: str | Path) -> dict[str, Any] | None:
    """The backbone's weights (backbone names) of a directory that is not a plain Hugging Face
    backbone: a transformers export of this library, or the PonderLM authors' GPT-NeoX directory
    (without their unused adapter). None for a plain GPT-NeoX/LLaMA directory (Pythia)."""
    from ponder_lightning.nn.hf import load_hf_state_dict

    directory = Path(path).expanduser()
    if is_transformers_export(directory):
        head = PREFIX + "backbone."
        return {k.removeprefix(head): v for k, v in load_file(str(directory / WEIGHTS_FILE)).items() if k.startswith(head)}
    if is_ponderlm_authors_dir(directory):
        return {k: v for k, v in load_hf_state_dict(directory).items() if k not in AUTHORS_UNUSED}
    return None


def pretrained_extra_state(path: str | Path, class_path: str) -> dict[str, Any]:
    """The weights outside the backbone (gates, routers) of a transformers export of the same
    model class; empty otherwise (a different class keeps its own initialisation)."""
    directory = Path(path).expanduser()
    if not is_transformers_export(directory) or json.loads((directory / "config.json").read_text()).get("class_path") != class_path:
        return {}
    return {k.removeprefix(PREFIX): v for k, v in load_file(str(directory / WEIGHTS_FILE)).items() if not k.startswith(PREFIX + "backbone.")}


def pretrained_scales_embeddings(path: str | Path) -> bool:
    """The embedding scale the weights at `path` were trained with: an export's own setting, the
    authors' config's `scale_embeds`, and none for a plain Hugging Face directory (Pythia)."""
    directory = Path(path).expanduser()
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if raw.get("model_type") == MODEL_TYPE:
        return bool(raw.get("init_args", {}).get("scale_embeds", False))
    return bool(raw.get("scale_embeds", False)) if raw.get(AUTHORS_FLAG) else False
