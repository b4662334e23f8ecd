"""Rebuild a trained model from what a run wrote, and export it to a Hugging Face directory.

`load_checkpoint` reads, for every model class and gate:
- a Lightning checkpoint written by `python -m ponder_lightning fit` (`last.ckpt`), a single file
  or the directory of shards written under FSDP (`save_distributed_checkpoint`);
- a directory written by `export_hf` (config.json + model.safetensors + ponder_lightning_config.json);
- a plain Hugging Face GPT-NeoX directory (a Pythia download), as a `VanillaLM`.

`export_hf` writes the backbone in transformers' layout, GPT-NeoX (or LLaMA for the LLaMA block),
so that `GPTNeoXForCausalLM.from_pretrained` (or `LlamaForCausalLM`) loads it; for VanillaLM that
*is* the model. For
pondering models, `ponder_lightning_config.json` (model class, init args, tokenizer) plus the
parameters outside the backbone (gates) in `ponder_lightning.safetensors`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from ponder_lightning.errors import UserError
from ponder_lightning.models.base import CausalLMModule

EXPORT_CONFIG = "ponder_lightning_config.json"
EXPORT_EXTRA_WEIGHTS = "ponder_lightning.safetensors"
EXPORT_FORMAT = "ponder_lightning.export"
# Init args that only matter while building a model for training, never when rebuilding one.
_BUILD_ONLY_ARGS = ("pretrained",)


class LoadedCheckpoint(NamedTuple):
    """`model` in eval mode on CPU, its `on_load_checkpoint` hook called (so it knows the step it
    was trained to); `data` the data module's recorded arguments, with `data["tokenizer"]` the
    tokenizer spec (`neox`, `bytes`, a path) when known, and `data["global_step"]`."""

    model: CausalLMModule
    data: dict[str, Any]


def load_checkpoint(path: str | Path, model_class: type[CausalLMModule] | None = None) -> LoadedCheckpoint:
    """Rebuild the model saved at `path` (see the module docstring for the accepted forms):
    `model, data = load_checkpoint("last.ckpt")`.

    `model_class` is only needed for checkpoints of models built in Python rather than by the
    CLI (those record no class path). Checkpoints are pickles: load only files you trust.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist: pass a .ckpt file (e.g. lightning_logs/version_0/checkpoints/last.ckpt) or an exported directory")
    if path.is_dir() and (path / "config.json").is_file():
        return _load_hf_dir(path)
    ckpt = _read_lightning_checkpoint(path)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    model = build_model(hparams, model_class, source=str(path))
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} holds no state_dict: it is not a Lightning checkpoint of a ponder_lightning model")
    _load_state(model, state, str(path))
    model.on_load_checkpoint(ckpt)
    data = {k: v for k, v in (ckpt.get("datamodule_hyper_parameters") or {}).items() if not k.startswith("_")}
    return LoadedCheckpoint(model.eval(), {**data, "global_step": int(ckpt.get("global_step", 0))})


def build_model(hparams: dict[str, Any], model_class: type[CausalLMModule] | None = None, source: str = "checkpoint") -> CausalLMModule:
    """A freshly initialised model from saved init args (`_class_path` as LightningCLI records it)."""
    from lightning.pytorch.cli import instantiate_module
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

    hparams = {k: v for k, v in hparams.items() if k != "_instantiator"}
    for name in _BUILD_ONLY_ARGS:
        if name in hparams:
            hparams[name] = None
    class_path = hparams.get("_class_path")
    if class_path is None and model_class is None:
        raise UserError(
            f"{source} records no model class (it was not written by the ponder_lightning CLI): "
            "pass model_class=<the LightningModule class> to load_checkpoint"
        )
    try:
        check_saved_args(hparams, model_class if class_path is None else _import(class_path), source)
        if class_path is None:
            return model_class(**hparams)
        # As LightningCLI does: the model's hparams stay this plain dict (gates as class_path +
        # init_args), so that an export or a new checkpoint records them the same way.
        with _given_hyperparameters_context(hparams=hparams, instantiator="lightning.pytorch.cli.instantiate_module"):
            return instantiate_module(CausalLMModule, hparams)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - jsonargparse raises many types for a bad class path
        raise invalid_saved_args(source, class_path or model_class.__name__, exc) from exc


def check_saved_args(saved: dict[str, Any], model_class: type, source: str) -> None:
    """Name the saved init arguments `model_class` no longer takes (renamed or removed since the
    checkpoint was written). Shared by every command that rebuilds a model from a checkpoint
    (`validate`/`test`/`predict --ckpt_path`, `generate`, `evaluate`, `export`)."""
    from ponder_lightning.resume import unknown_saved_args

    unknown = unknown_saved_args(saved, model_class)
    if unknown:
        raise UserError(
            f"{source} was saved with model arguments {model_class.__name__} no longer takes (renamed or removed since): "
            f"{', '.join(f'{k}={saved[k]!r}' for k in unknown)}: rename them in the checkpoint's hyper_parameters, "
            "or use the code version it was trained with"
        )


def _import(class_path: str) -> type:
    from jsonargparse.typing import import_object

    return import_object(class_path)


def invalid_saved_args(source: str, class_name: str, exc: BaseException) -> UserError:
    """The error for saved init arguments that no longer validate, naming the argument from
    jsonargparse's nested report (`gate.init_args.tau: got 3.0, but it must be ...`). Shared by
    every command that rebuilds a model from a checkpoint."""
    from ponder_lightning.cli_errors import parser_error_message

    text = str(exc).strip()
    if 'Parser key "' not in text and "is not accepted" not in text:
        return UserError(f"{source}: could not rebuild {class_name} from its saved arguments ({_first_line(exc)})")
    reason = parser_error_message(text, []).split(": check its spelling")[0]  # advice for a config, not a checkpoint
    for prefix in ("module.", "model.", "init_args."):  # the CLI's and instantiate_module's roots
        reason = reason.removeprefix(prefix)
    return UserError(
        f"{source}: could not rebuild {class_name} from its saved arguments ({reason}): fix it in the checkpoint's "
        "hyper_parameters, or use the code version it was trained with"
    )


def _read_lightning_checkpoint(path: Path) -> dict[str, Any]:
    if path.is_dir():
        from lightning.fabric.utilities.load import _METADATA_FILENAME, _load_distributed_checkpoint

        if not (path / _METADATA_FILENAME).is_file():
            raise UserError(f"{path} is a directory but neither an FSDP checkpoint ({_METADATA_FILENAME}) nor an exported model (config.json)")
        return _load_distributed_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - unpickling raises many types for a damaged file
        raise UserError(f"checkpoint {path} could not be read ({_first_line(exc)}): it is damaged or not a PyTorch checkpoint") from exc


def _load_state(model: CausalLMModule, state: dict[str, torch.Tensor], source: str) -> None:
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # torch.compile'd runs
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(
            f"{source} does not match {type(model).__name__} built from its own arguments: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def _load_hf_dir(path: Path) -> LoadedCheckpoint:
    from ponder_lightning import hf_export

    if hf_export.is_transformers_export(path):  # `export --format transformers`
        return hf_export.load_transformers_dir(path)
    if hf_export.is_ponderlm_authors_dir(path):  # a GPT-NeoX saved by the PonderLM authors' code
        return hf_export.load_ponderlm_authors_dir(path)
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
    tokenizer = meta.get("tokenizer")
    return LoadedCheckpoint(model.eval(), {"global_step": step, **({"tokenizer": tokenizer} if tokenizer else {})})


def _vanilla_from_hf(path: Path) -> CausalLMModule:
    """A VanillaLM shaped like a local GPT-NeoX checkpoint, with its weights."""
    from ponder_lightning.models.vanilla import VanillaLM
    from ponder_lightning.nn.hf import read_hf_config

    cfg = read_hf_config(path)
    return VanillaLM(
        size=_preset_for(cfg, path), n_layer=cfg.n_layer, d_model=cfg.d_model, n_head=cfg.n_head, vocab_size=cfg.vocab_size,
        max_seq_len=cfg.max_seq_len, pretrained=str(path),
    )


def _preset_for(cfg, path: Path) -> str:
    """A size preset with the checkpoint's fixed shape fields (the rest are init args)."""
    from ponder_lightning.nn.config import PRESETS, backbone_config

    fixed = ("block", "mlp_ratio", "rotary_pct", "rotary_base", "norm_eps")  # not init args: a preset must have them
    size = next((name for name in PRESETS if all(getattr(backbone_config(name), f) == getattr(cfg, f) for f in fixed)), None)
    if size is None:
        raise UserError(f"{path}: no size preset has its {', '.join(f'{f}={getattr(cfg, f)}' for f in fixed)}: it cannot be built here")
    return size


def export_hf(model: CausalLMModule, out: str | Path, tokenizer: str | None = None, global_step: int = 0) -> Path:
    """Write `model` as a Hugging Face GPT-NeoX directory (see the module docstring).
    `global_step` is recorded for models whose behaviour depends on it (gate_start_step)."""
    from ponder_lightning.nn.hf import save_hf_backbone

    out = Path(out)
    save_hf_backbone(model.backbone, out)
    extra = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    config = out / EXPORT_CONFIG
    if type(model).__name__ == "VanillaLM" and not extra:
        config.unlink(missing_ok=True)  # a vanilla export is a plain GPT-NeoX checkpoint
        (out / EXPORT_EXTRA_WEIGHTS).unlink(missing_ok=True)
    else:
        init_args = {k: v for k, v in dict(model.hparams).items() if not k.startswith("_") and k not in _BUILD_ONLY_ARGS}
        meta = {
            "format": EXPORT_FORMAT,
            "version": 1,
            "class_path": f"{type(model).__module__}.{type(model).__qualname__}",
            "init_args": _jsonable(init_args),
            "tokenizer": tokenizer,
            "global_step": global_step,
            "note": "config.json/model.safetensors hold the backbone in Hugging Face layout (GPT-NeoX or LLaMA); transformers loads it as a "
                    "plain GPT-NeoX, which is NOT this pondering model: load the whole model with "
                    "ponder_lightning.models.checkpoint.load_checkpoint(<this directory>)",
        }
        config.write_text(json.dumps(meta, indent=2) + "\n")
        if extra:
            save_file(extra, str(out / EXPORT_EXTRA_WEIGHTS), metadata={"format": "pt"})
    if tokenizer is not None:
        from ponder_lightning.hf_export import write_tokenizer

        write_tokenizer(tokenizer, out, model.config.max_seq_len)
    return out


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


def export_command(argv: list[str]) -> None:
    """`export --checkpoint last.ckpt --out DIR [--format backbone|transformers]`: write a trained
    model as a Hugging Face directory. `backbone` (default): the backbone as a plain GPT-NeoX/LLaMA
    checkpoint plus ponder_lightning's files; `transformers`: the whole pondering model, loaded by
    `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` (needs ponder_lightning
    installed where it is loaded)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ponder_lightning export", description=export_command.__doc__)
    parser.add_argument("--checkpoint", required=True, help="a .ckpt written by `fit` (file or FSDP directory), or an exported directory")
    parser.add_argument("--out", required=True, help="output directory (created; existing files are replaced)")
    parser.add_argument("--format", choices=("backbone", "transformers"), default="backbone",
                        help="backbone: plain GPT-NeoX/LLaMA backbone + ponder_lightning files; transformers: the whole model with remote code")
    args = parser.parse_args(argv)
    model, data = load_checkpoint(args.checkpoint)
    if args.format == "transformers":
        from ponder_lightning.hf_export import export_transformers

        out = export_transformers(model, args.out, data.get("tokenizer"), data.get("global_step", 0))
        note = "" if data.get("tokenizer") else " (no tokenizer recorded: add the tokenizer files yourself)"
        print(f"exported {type(model).__name__} at step {data.get('global_step', 0)} to {out} as a transformers model: "
              f"AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True){note}")
        return
    out = export_hf(model, args.out, data.get("tokenizer"), data.get("global_step", 0))
    kind = "GPT-NeoX checkpoint" if not (out / EXPORT_CONFIG).exists() else f"{type(model).__name__} (backbone in Hugging Face layout + {EXPORT_CONFIG})"
    print(f"exported {kind} at step {data.get('global_step', 0)} to {out}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
