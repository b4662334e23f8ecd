"""Write a trained model as a Hugging Face directory: `python -m ponder_lightning export`.

`export_hf(model, out, tokenizer, global_step)` (`--format backbone`, the default) writes the
backbone in transformers' layout, GPT-NeoX (or LLaMA for the LLaMA block), so that
`GPTNeoXForCausalLM.from_pretrained` (or `LlamaForCausalLM`) loads it; for VanillaLM that *is*
the model. For pondering models (and any model given its run's data settings),
`ponder_lightning_config.json` (model class, init args, tokenizer, step, data settings) plus the
parameters outside the backbone (gates) in `ponder_lightning.safetensors`.

`export_transformers(model, out, tokenizer, global_step)` (`--format transformers`) writes:
- `config.json`: `model_type: ponder_lightning`, the model's class path and init arguments, the
  step it was trained to, the run's data settings (`data_args`), `auto_map` naming the two
  classes of `modeling_ponder_lightning.py`;
- `model.safetensors`: the model's whole state dict (backbone, gates, routers) under `model.`;
- `modeling_ponder_lightning.py`: a copy of `ponder_lightning/io/hf_modeling.py`, a thin
  `PreTrainedModel` that imports the installed package and rebuilds the model (see its docstring
  for why the recurrence is imported rather than copied);
- `generation_config.json`: EOS, no cache, and the padded vocabulary's ids beyond the tokenizer
  suppressed (as `ponder_lightning.generate` does);
- the tokenizer (`tokenizer.json` + `tokenizer_config.json`) for `neox`, `bpe4k`, `bytes` or a
  local tokenizer file/directory, so that `AutoTokenizer.from_pretrained(out)` works.

The data settings are recorded so that `evaluate` on an export validates on the blocks its run
held out. Either export first removes the files an earlier export wrote in `out` (EXPORT_MARKER
lists them) and refuses to replace any other file (the user's) without `overwrite`.
Both directories, and the PonderLM authors' GPT-NeoX directories, are read back by
`ponder_lightning.io.load.load_checkpoint`; the file and field names are
`ponder_lightning.io.formats`'s.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import save_file

from ponder_lightning.data.tokenizer import EOS_TEXT
from ponder_lightning.errors import UserError
from ponder_lightning.io.formats import (
    EXPORT_CONFIG,
    EXPORT_EXTRA_WEIGHTS,
    EXPORT_FORMAT,
    MODEL_TYPE,
    PREFIX,
    WEIGHTS_FILE,
)

if TYPE_CHECKING:
    from ponder_lightning.models import CausalLMModule

MODELING_FILE = "modeling_ponder_lightning.py"
#: What an export leaves in its directory: the files it wrote, with their size and modification time.
EXPORT_MARKER = ".ponder_lightning_export.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
#: Every file either format writes. An export first removes those an earlier export wrote in `out`
#: (listed in EXPORT_MARKER), so that nothing of it (of the other format, or with a tokenizer) is read
#: back with the new one; any other file of these names is the user's, and is never touched.
EXPORT_FILES = (
    "config.json",
    WEIGHTS_FILE,
    MODELING_FILE,
    "generation_config.json",
    EXPORT_CONFIG,
    EXPORT_EXTRA_WEIGHTS,
    *TOKENIZER_FILES,
)


def export_transformers(
    model,
    out: str | Path,
    tokenizer: str | None = None,
    global_step: int = 0,
    data: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` (any CausalLMModule) as a transformers directory (see the module docstring).
    `data`: the data module's arguments as `load_checkpoint` returns them, recorded so that
    `evaluate` on the export validates on the run's own blocks."""
    from ponder_lightning import __version__
    from ponder_lightning.io.load import BUILD_ONLY_ARGS

    out = _fresh_out(out, tokenizer, overwrite)
    cfg = model.config
    tokenizer_vocab, eos = _tokenizer_facts(tokenizer)
    init_args = {k: v for k, v in dict(model.hparams).items() if not k.startswith("_") and k not in BUILD_ONLY_ARGS}
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
        "data_args": _data_args(data),
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
    if tokenizer is not None:
        write_tokenizer(tokenizer, out, cfg.max_seq_len)
    return _finish(out)


def check_export_dir(out: str | Path, overwrite: bool = False) -> list[str]:
    """The files of an earlier export in `out` that a new export replaces; refuses (one line naming
    them) when `out` holds a file an export would write but did not (the user's), unless
    `overwrite`. Called before the model is loaded; `out` is created."""
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written = _written_by_export(out)
    clash = sorted(n for n in EXPORT_FILES if (out / n).exists() and n not in written)
    if clash and not overwrite:
        raise UserError(
            f"--out {out} holds {', '.join(clash)}, not written by an export (or changed since): they would be "
            "replaced or removed. Export to a new or empty directory, or pass --overwrite to replace them"
        )
    return sorted({*written, *clash})


def _written_by_export(out: Path) -> set[str]:
    """The files the export marker in `out` lists, as long as each is unchanged since (same size
    and modification time): those an export may remove."""
    try:
        record = json.loads((out / EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        return set()
    files = record.get("files") if isinstance(record, dict) else None
    kept = set()
    for name, stamp in (files or {}).items():
        path = out / str(name)
        if name in EXPORT_FILES and path.is_file() and list(stamp) == _stamp(path):
            kept.add(str(name))
    return kept


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _fresh_out(out: str | Path, tokenizer: str | None, overwrite: bool = False) -> Path:
    """`out`, created, without the files of an earlier export (see `check_export_dir`)."""
    out = Path(out).expanduser()
    source = Path(tokenizer).expanduser() if tokenizer is not None else None
    if source is not None and source.is_dir() and out.is_dir() and source.samefile(out):
        raise UserError(
            f"the tokenizer to export is the directory --out {out} itself (an export being re-exported in place): "
            "export to another directory"
        )
    for name in check_export_dir(out, overwrite):
        (out / name).unlink(missing_ok=True)
    (out / EXPORT_MARKER).unlink(missing_ok=True)
    return out


def _finish(out: Path) -> Path:
    """Give the written files the user's umask (safetensors writes 0600) and record them in the
    marker, so that the next export into `out` removes these and nothing else."""
    mask = os.umask(0)
    os.umask(mask)
    files = {}
    for name in EXPORT_FILES:
        path = out / name
        if path.is_file():
            path.chmod(0o666 & ~mask)
            files[name] = _stamp(path)
    (out / EXPORT_MARKER).write_text(json.dumps({"files": files}, indent=2) + "\n")
    (out / EXPORT_MARKER).chmod(0o666 & ~mask)
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
    """Tokenizer files transformers' `AutoTokenizer` loads, giving the ids of `load_tokenizer(spec)`.
    `split_special_tokens` makes them encode text as text, as `load_tokenizer`'s do: a literal
    "<|endoftext|>" in a prompt is bytes, not the EOS id."""
    from ponder_lightning.data.tokenizer import (
        BPE4K_ALIASES,
        KNOWN_EOS_TOKENS,
        NEOX_ALIASES,
        VENDORED_BPE4K,
        VENDORED_NEOX,
    )

    path = Path(spec).expanduser()
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len}
    if path.is_dir():
        for name in TOKENIZER_FILES:
            if (path / name).is_file():
                shutil.copyfile(path / name, out / name)
        if not (out / "tokenizer_config.json").is_file():
            return
        config, eos = json.loads((out / "tokenizer_config.json").read_text()), None  # its own names its EOS
    elif path.is_file():
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
    if eos is not None:
        config.update(bos_token=eos, eos_token=eos, unk_token=eos, pad_token=eos)
    config["split_special_tokens"] = True
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
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def export_hf(
    model: CausalLMModule,
    out: str | Path,
    tokenizer: str | None = None,
    global_step: int = 0,
    data: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` as a Hugging Face GPT-NeoX directory (see the module docstring).
    `global_step` is recorded for models whose behaviour depends on it (gate_start_step), `data`
    (the data module's arguments as `load_checkpoint` returns them) so that `evaluate` on the
    export validates on the run's own blocks. A VanillaLM without them is a bare GPT-NeoX directory."""
    from ponder_lightning.io.load import BUILD_ONLY_ARGS
    from ponder_lightning.nn.hf import save_hf_backbone

    out = _fresh_out(out, tokenizer, overwrite)
    save_hf_backbone(model.backbone, out)
    extra = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    data_args = _data_args(data)
    if type(model).__name__ != "VanillaLM" or extra or data_args:  # else a plain GPT-NeoX checkpoint
        init_args = {k: v for k, v in dict(model.hparams).items() if not k.startswith("_") and k not in BUILD_ONLY_ARGS}
        meta = {
            "format": EXPORT_FORMAT,
            "version": 1,
            "class_path": f"{type(model).__module__}.{type(model).__qualname__}",
            "init_args": _jsonable(init_args),
            "tokenizer": tokenizer,
            "global_step": global_step,
            "data_args": data_args,
            "note": "config.json/model.safetensors hold the backbone in Hugging Face layout (GPT-NeoX or LLaMA); "
            "transformers loads it as a plain GPT-NeoX, which is NOT this pondering model: load the whole model with "
            "ponder_lightning.io.load.load_checkpoint(<this directory>)",
        }
        (out / EXPORT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        if extra:
            save_file(extra, str(out / EXPORT_EXTRA_WEIGHTS), metadata={"format": "pt"})
    if tokenizer is not None:
        write_tokenizer(tokenizer, out, model.config.max_seq_len)
    return _finish(out)


def _data_args(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """The data module's arguments to record (the step is recorded on its own)."""
    return None if data is None else _jsonable({k: v for k, v in data.items() if k != "global_step"})


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "__dict__"):  # a gate or regulariser object (models built in Python)
        accepted = inspect.signature(type(value).__init__).parameters
        init = {k: _jsonable(v) for k, v in vars(value).items() if k in accepted and k != "self"}
        return {"class_path": f"{type(value).__module__}.{type(value).__qualname__}", "init_args": init}
    return str(value)


#: `export`'s formats: the writer of each.
FORMATS = {"backbone": export_hf, "transformers": export_transformers}


def export_model(
    model: CausalLMModule,
    out: str | Path,
    format: str = "backbone",
    tokenizer: str | None = None,
    global_step: int = 0,
    data: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` to `out` in `format` (`backbone` or `transformers`, see the module
    docstring): the one way out, as `io.load_checkpoint` is the one way in."""
    if format not in FORMATS:
        raise UserError(f"export format {format!r} is unknown: use one of {', '.join(FORMATS)}")
    return FORMATS[format](model, out, tokenizer, global_step, data, overwrite)
