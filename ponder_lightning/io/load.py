"""Rebuild a trained model from what a run or an export wrote.

`load_checkpoint` reads, for every model class and gate:
- a Lightning checkpoint written by `python -m ponder_lightning fit` (`last.ckpt`), a single file
  or the directory of shards written under FSDP (`save_distributed_checkpoint`);
- a directory written by `export --format backbone` (`hf_export.export_hf`: config.json +
  model.safetensors + ponder_lightning_config.json);
- a directory written by `export --format transformers` (`hf_export.export_transformers`);
- a GPT-NeoX directory saved by the PonderLM authors' training code, as a PonderLM;
- a plain Hugging Face GPT-NeoX directory (a Pythia download), as a `VanillaLM`.

`build_model`, `check_saved_args` and `invalid_saved_args` are shared by every command that
rebuilds a model from saved init arguments. The file formats are named in
`ponder_lightning.io.formats`; writing them is `ponder_lightning.io.export`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file

from ponder_lightning.data.tokenizer import is_builtin_tokenizer
from ponder_lightning.errors import UserError, first_line
from ponder_lightning.io.formats import (
    AUTHORS_UNUSED,
    EXPORT_CONFIG,
    EXPORT_EXTRA_WEIGHTS,
    MODEL_TYPE,
    PREFIX,
    WEIGHTS_FILE,
    is_ponderlm_authors_dir,
    is_transformers_export,
)
from ponder_lightning.io.safe import torch_load, verify_sharded
from ponder_lightning.models.base import CausalLMModule
from ponder_lightning.upstream import (
    DISTRIBUTED_CHECKPOINT_METADATA,
    given_hyperparameters,
    load_distributed_checkpoint,
)

# Init args that only matter while building a model for training, never when rebuilding one.
BUILD_ONLY_ARGS = ("pretrained",)


class LoadedCheckpoint(NamedTuple):
    """`model` in eval mode on CPU, its `on_load_checkpoint` hook called (so it knows the step it
    was trained to); `data` the data module's recorded arguments (a .ckpt's, or those an export of
    it recorded), with `data["tokenizer"]` the tokenizer spec (`neox`, `bytes`, a path) when known,
    and `data["global_step"]`."""

    model: CausalLMModule
    data: dict[str, Any]


def load_checkpoint(
    path: str | Path, model_class: type[CausalLMModule] | None = None, trusted: bool = False
) -> LoadedCheckpoint:
    """Rebuild the model saved at `path` (see the module docstring for the accepted forms):
    `model, data = load_checkpoint("last.ckpt")`.

    `model_class` is only needed for checkpoints of models built in Python rather than by the
    CLI (those record no class path). Reading runs no code (`ponder_lightning.io.safe`): a
    checkpoint holding more than tensors and plain data is refused unless `trusted=True`.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(
            f"checkpoint {path} does not exist: pass a .ckpt file (e.g. "
            "lightning_logs/version_0/checkpoints/last.ckpt) or an exported directory"
        )
    if path.is_dir() and (path / "config.json").is_file():
        return _load_hf_dir(path)
    ckpt = _read_lightning_checkpoint(path, trusted)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    model = build_model(hparams, model_class, source=str(path))
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise UserError(
            f"checkpoint {path} holds no state_dict: it is not a Lightning checkpoint of a ponder_lightning model"
        )
    _load_state(model, state, str(path))
    model.on_load_checkpoint(ckpt)
    data = {k: v for k, v in (ckpt.get("datamodule_hyper_parameters") or {}).items() if not k.startswith("_")}
    return LoadedCheckpoint(model.eval(), {**data, "global_step": int(ckpt.get("global_step", 0))})


def build_model(
    hparams: dict[str, Any], model_class: type[CausalLMModule] | None = None, source: str = "checkpoint"
) -> CausalLMModule:
    """A freshly initialised model from saved init args (`_class_path` as LightningCLI records it)."""
    from lightning.pytorch.cli import instantiate_module

    hparams = {k: v for k, v in hparams.items() if k != "_instantiator"}
    for name in BUILD_ONLY_ARGS:
        if name in hparams:
            hparams[name] = None
    class_path = hparams.get("_class_path")
    if class_path is None and model_class is None:
        raise UserError(
            f"{source} records no model class (it was not written by the ponder_lightning CLI): "
            "pass model_class=<the LightningModule class> to load_checkpoint"
        )
    try:
        cls = model_class if class_path is None else _import(class_path)
        if not (isinstance(cls, type) and issubclass(cls, CausalLMModule)):
            raise UserError(
                f"{source} records the class {class_path or cls}, but {class_path or cls} is not a ponder_lightning "
                "model (a CausalLMModule): it was not written by this library"
            )
        check_saved_args(hparams, cls, source)
        if class_path is None:
            return model_class(**hparams)
        # As LightningCLI does: the model's hparams stay this plain dict (gates as class_path +
        # init_args), so that an export or a new checkpoint records them the same way.
        with given_hyperparameters(hparams=hparams, instantiator="lightning.pytorch.cli.instantiate_module"):
            return instantiate_module(CausalLMModule, hparams)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - jsonargparse raises many types for a bad class path
        raise invalid_saved_args(source, class_path or model_class.__name__, exc) from exc


def check_saved_args(saved: dict[str, Any], model_class: type, source: str) -> None:
    """Name the saved init arguments `model_class` no longer takes (renamed or removed since the
    checkpoint was written). Shared by every command that rebuilds a model from a checkpoint
    (`validate`/`test`/`predict --ckpt_path`, `generate`, `evaluate`, `export`)."""
    from ponder_lightning.io.compat import unknown_saved_args

    unknown = unknown_saved_args(saved, model_class)
    if unknown:
        raise UserError(
            f"{source} was saved with model arguments {model_class.__name__} no longer takes "
            f"(renamed or removed since): {', '.join(f'{k}={saved[k]!r}' for k in unknown)}: rename "
            "them in the checkpoint's hyper_parameters, or use the code version it was trained with"
        )


def _import(class_path: str) -> type:
    from jsonargparse.typing import import_object

    return import_object(class_path)


def invalid_saved_args(source: str, class_name: str, exc: BaseException) -> UserError:
    """The error for saved init arguments that no longer validate, naming the argument from
    jsonargparse's nested report (`gate.init_args.tau: got 3.0, but it must be ...`). Shared by
    every command that rebuilds a model from a checkpoint."""
    from ponder_lightning.parser_errors import parser_error_message

    text = str(exc).strip()
    if 'Parser key "' not in text and "is not accepted" not in text:
        return UserError(f"{source}: could not rebuild {class_name} from its saved arguments ({first_line(exc)})")
    reason = parser_error_message(text, []).split(": check its spelling")[0]  # advice for a config, not a checkpoint
    for prefix in ("module.", "model.", "init_args."):  # the CLI's and instantiate_module's roots
        reason = reason.removeprefix(prefix)
    return UserError(
        f"{source}: could not rebuild {class_name} from its saved arguments ({reason}): fix it in the checkpoint's "
        "hyper_parameters, or use the code version it was trained with"
    )


def _read_lightning_checkpoint(path: Path, trusted: bool) -> dict[str, Any]:
    if path.is_dir():
        if not (path / DISTRIBUTED_CHECKPOINT_METADATA).is_file():
            raise UserError(
                f"{path} is a directory but neither an FSDP checkpoint "
                f"({DISTRIBUTED_CHECKPOINT_METADATA}) nor an exported model (config.json)"
            )
        if not trusted:
            verify_sharded(path)
        return load_distributed_checkpoint(path)
    return torch_load(path, trusted=trusted)


def _load_state(model: CausalLMModule, state: dict[str, torch.Tensor], source: str) -> None:
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # torch.compile'd runs
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(
            f"{source} does not match {type(model).__name__} built from its own arguments: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def _load_hf_dir(path: Path) -> LoadedCheckpoint:
    if is_transformers_export(path):  # `export --format transformers`
        return load_transformers_dir(path)
    if is_ponderlm_authors_dir(path):  # a GPT-NeoX saved by the PonderLM authors' code
        return load_ponderlm_authors_dir(path)
    config_file = path / EXPORT_CONFIG
    if not config_file.is_file():
        return LoadedCheckpoint(_vanilla_from_hf(path).eval(), {"global_step": 0})
    meta = json.loads(config_file.read_text())
    model = build_model({"_class_path": meta["class_path"], **meta["init_args"]}, source=str(config_file))
    from ponder_lightning.nn.hf import load_hf_state_dict

    state = {f"backbone.{k}": v for k, v in load_hf_state_dict(path).items()}
    extra = path / EXPORT_EXTRA_WEIGHTS
    if extra.is_file():
        state.update(load_file(str(extra)))
    _load_state(model, state, str(path))
    step = int(meta.get("global_step", 0))
    model.on_load_checkpoint({"global_step": step})
    data = _recorded_data(meta, step)
    if meta.get("tokenizer"):
        data["tokenizer"] = meta["tokenizer"]
    return LoadedCheckpoint(model.eval(), data)


def load_transformers_dir(path: Path) -> LoadedCheckpoint:
    """(model, data) from a directory written by `export_transformers`, as `load_checkpoint` returns them."""
    meta = json.loads((path / "config.json").read_text())
    if not meta.get("class_path"):
        raise UserError(
            f"{path}/config.json has model_type {MODEL_TYPE} but no "
            "class_path: it was not written by this library's export"
        )
    model = build_model(
        {"_class_path": meta["class_path"], **meta.get("init_args", {})}, source=str(path / "config.json")
    )
    if not (path / WEIGHTS_FILE).is_file():
        raise UserError(f"{path} has no {WEIGHTS_FILE}")
    state = load_file(str(path / WEIGHTS_FILE))
    _load_state(model, {k.removeprefix(PREFIX): v for k, v in state.items()}, str(path))
    step = int(meta.get("global_step", 0))
    model.on_load_checkpoint({"global_step": step})
    data = _recorded_data(meta, step)
    tokenizer = meta.get("tokenizer")
    if tokenizer is not None and is_builtin_tokenizer(str(tokenizer)):
        data["tokenizer"] = tokenizer  # the library's own ids (`bytes` keeps its text-only EOS rule)
    elif (path / "tokenizer.json").is_file():
        data["tokenizer"] = str(path)  # the copy written next to the weights
    return LoadedCheckpoint(model.eval(), data)


def _recorded_data(meta: dict[str, Any], step: int) -> dict[str, Any]:
    """An export's record of the data module's arguments (what `load_checkpoint` returns for the
    .ckpt it came from) plus the step. Exports written before the record existed have none: then
    only the tokenizer is known, and `evaluate` falls back to the data module's defaults."""
    return {**(meta.get("data_args") or {}), "global_step": step}


def load_ponderlm_authors_dir(path: Path) -> LoadedCheckpoint:
    """A PonderLM from a GPT-NeoX directory saved by the PonderLM authors' code: the backbone's
    weights, `pondering_steps`, `scale_embeds` and `mutiply_pondering_steps` from config.json,
    the full-vocabulary mixture (their forward's `use_topk=False`)."""
    from ponder_lightning.models.ponder import PonderLM
    from ponder_lightning.nn.hf import load_hf_state_dict, load_into, read_hf_config

    raw = json.loads((path / "config.json").read_text())
    cfg = read_hf_config(path)
    model = PonderLM(
        **_shape_of(cfg, path),
        pondering_steps=int(raw.get("pondering_steps", 3)),
        scale_embeds=bool(raw.get("scale_embeds", False)),
        multiply_pondering_steps=bool(raw.get("mutiply_pondering_steps", raw.get("multiply_pondering_steps", False))),
    )
    state = {k: v for k, v in load_hf_state_dict(path).items() if k not in AUTHORS_UNUSED}
    load_into(model.backbone, state, source=str(path))
    tokenizer = {"tokenizer": str(path)} if (path / "tokenizer.json").is_file() else {}
    return LoadedCheckpoint(model.eval(), {"global_step": 0, **tokenizer})


def _shape_of(cfg: Any, path: Path) -> dict[str, Any]:
    """The model arguments that reproduce a Hugging Face checkpoint's shape."""
    return dict(
        size=_preset_for(cfg, path),
        n_layer=cfg.n_layer,
        d_model=cfg.d_model,
        n_head=cfg.n_head,
        vocab_size=cfg.vocab_size,
        max_seq_len=cfg.max_seq_len,
    )


def _vanilla_from_hf(path: Path) -> CausalLMModule:
    """A VanillaLM shaped like a local GPT-NeoX checkpoint, with its weights."""
    from ponder_lightning.models.vanilla import VanillaLM
    from ponder_lightning.nn.hf import read_hf_config

    cfg = read_hf_config(path)
    return VanillaLM(**_shape_of(cfg, path), pretrained=str(path))


def _preset_for(cfg, path: Path) -> str:
    """A size preset with the checkpoint's fixed shape fields (the rest are init args)."""
    from ponder_lightning.nn.config import PRESETS, backbone_config

    fixed = ("block", "mlp_ratio", "rotary_pct", "rotary_base", "norm_eps")  # not init args: a preset must have them
    size = next(
        (name for name in PRESETS if all(getattr(backbone_config(name), f) == getattr(cfg, f) for f in fixed)), None
    )
    if size is None:
        raise UserError(
            f"{path}: no size preset has its "
            f"{', '.join(f'{f}={getattr(cfg, f)}' for f in fixed)}: it cannot be built here"
        )
    return size
