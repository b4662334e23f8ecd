"""What a checkpoint passed to `fit`/`validate`/`test`/`predict --ckpt_path` must agree on with the
config, and what a resumed run may change.

Stock LightningCLI silently replaces the configured model (class and arguments) by the
checkpoint's, so `validate --config vanilla.yaml --ckpt_path ada.ckpt` validates an AdaPonderLM and
`fit --ckpt_path last --model.init_args.lr 3e-4` keeps the old learning rate. Here:

- a missing checkpoint file, or a directory that is no sharded checkpoint, is an error before
  anything is built; `last` is resolved to the file Lightning would load and checked like one
  (`cli.PonderCLI._resolve_last`);
- a different model class is an error (the config and the checkpoint must describe one model);
- `fit` (a resume) builds the model from the config: changed arguments are listed in one notice,
  and the optimizer settings (lr, weight decay, betas) are applied to the optimizer state restored
  from the checkpoint (`apply_optimizer_changes`) — the standard "rewind and lower the LR";
- `validate`/`test`/`predict` evaluate the checkpoint's model as trained: its saved arguments
  replace the config's (one notice lists the ones that differed);
- a saved argument the model class no longer accepts (renamed or removed) is named;
- weights of another shape than the model built (another tokenizer, `size`, `n_layer`, gate) are
  an error naming the settings that differ (`check_weights_fit`), not Lightning's `size mismatch`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from ponder_lightning.errors import UserError
from ponder_lightning.io.safe import torch_load, verify_sharded
from ponder_lightning.upstream import DISTRIBUTED_CHECKPOINT_METADATA

#: `--ckpt_path` values Lightning resolves itself (not file names).
SPECIAL_CKPT_PATHS = ("last", "best", "hpc")
#: Init arguments that set the optimizer; `apply_optimizer_changes` applies them on resume.
OPTIMIZER_ARGS = ("lr", "weight_decay", "betas")
#: Saved arguments that are bookkeeping, not choices (set by the CLI's links, or private).
_IGNORED = ("tokenizer_vocab_size", "_instantiator", "_class_path")


def check_ckpt_path(ckpt_path: str | None, subcommand: str) -> None:
    """A `--ckpt_path` that names no file or sharded checkpoint directory is an error now, not a
    traceback later."""
    if ckpt_path is None or ckpt_path in SPECIAL_CKPT_PATHS or str(ckpt_path).startswith("registry"):
        return
    path = Path(ckpt_path).expanduser()
    if not path.exists():
        hint = (
            "'last' to resume from the newest last.ckpt under lightning_logs/"
            if subcommand == "fit"
            else "an existing checkpoint"
        )
        raise UserError(
            f"--ckpt_path {ckpt_path} does not exist: pass an existing .ckpt file (e.g. "
            f"lightning_logs/version_0/checkpoints/last.ckpt) or {hint}"
        )
    if path.is_dir() and not is_sharded_checkpoint(path):
        raise UserError(
            f"--ckpt_path {ckpt_path} is a directory but not an FSDP checkpoint ({DISTRIBUTED_CHECKPOINT_METADATA}): "
            "pass a .ckpt file in it (e.g. its checkpoints/last.ckpt)"
        )
    if path.is_dir():
        verify_sharded(path)  # Lightning reads it with torch.distributed.checkpoint's unrestricted unpickler


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A directory of shards written under FSDP (`save_distributed_checkpoint`)."""
    return (Path(path).expanduser() / DISTRIBUTED_CHECKPOINT_METADATA).is_file()


def read_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint file, memory-mapped: its arguments and tensor shapes can be read
    without loading the weights into memory."""
    return torch_load(ckpt_path, mmap=True)


def saved_hparams(ckpt_path: str | Path) -> dict[str, Any]:
    """The model's saved init arguments (`_class_path` included)."""
    return dict(read_checkpoint(ckpt_path).get("hyper_parameters") or {})


def short_class(path: str | None) -> str:
    return (path or "?").rsplit(".", 1)[-1]


def check_same_class(config_class: str | None, saved_class: str | None, ckpt_path: str) -> None:
    """The config and the checkpoint must describe the same model class."""
    if config_class and saved_class and short_class(config_class) != short_class(saved_class):
        raise UserError(
            f"--ckpt_path {ckpt_path} holds a model of class {short_class(saved_class)} but the config "
            f"builds a {short_class(config_class)}: pass the config it was trained with (model.class_path: "
            f"{saved_class}, e.g. the config.yaml in its lightning_logs/version_N directory)"
        )


def accepted_args(model_class: type) -> set[str]:
    """Init arguments a model class accepts, through the chain of `**kwargs` to its base."""
    import inspect

    names: set[str] = set()
    for cls in model_class.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        names |= {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return names


def unknown_saved_args(saved: dict[str, Any], model_class: type) -> list[str]:
    """Saved arguments the class no longer takes (renamed or removed since the checkpoint)."""
    accepted = accepted_args(model_class)
    return sorted(k for k in saved if not k.startswith("_") and k not in _IGNORED and k not in accepted)


def changed_args(saved: dict[str, Any], configured: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """name -> (saved, configured) for the arguments whose values differ."""
    out = {}
    for name, new in configured.items():
        # None means "the class decides" (a preset, the tokenizer, a default resolved at
        # construction and saved resolved), so it changes nothing the checkpoint recorded.
        if name in _IGNORED or name.startswith("_") or name not in saved or new is None:
            continue
        old = saved[name]
        if _plain(old) != _plain(new):
            out[name] = (old, new)
    return out


def _plain(value: Any) -> Any:
    if hasattr(value, "as_dict"):  # a jsonargparse Namespace (gate: class_path + init_args)
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != "dict_kwargs" or v}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def describe_changes(changes: dict[str, tuple[Any, Any]], used: str = "config") -> str:
    """`name old -> new` (the config's value is used), or `name=saved (config: value)`."""
    if used == "config":
        return ", ".join(f"{name} {_short(old)} -> {_short(new)}" for name, (old, new) in changes.items())
    return ", ".join(f"{name}={_short(old)} (config: {_short(new)})" for name, (old, new) in changes.items())


def _short(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, dict) and "class_path" in value:
        args = value.get("init_args") or {}
        return f"{short_class(value['class_path'])}({', '.join(f'{k}={v}' for k, v in args.items())})"
    return str(value)


def check_weights_fit(
    model: torch.nn.Module, ckpt: dict[str, Any], ckpt_path: str, differences: dict[str, tuple[Any, Any]]
) -> None:
    """The checkpoint's tensors must have the names and shapes of the model built for it, or
    Lightning's load fails with a `size mismatch` / `Missing key(s)` RuntimeError listing every
    tensor. `differences`: setting -> (checkpoint's, configured) of the settings that may explain
    it (the tokenizer sets the vocabulary; size, n_layer, ... the shapes; the gate its weights)."""
    saved = ckpt.get("state_dict")
    if not isinstance(saved, dict):
        return  # not a Lightning checkpoint of a LightningModule: Lightning says so itself
    saved = {k.replace("_orig_mod.", ""): v for k, v in saved.items()}  # torch.compile'd runs
    built = {k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()}
    problems = [
        f"{k} {list(saved[k].shape)} in the checkpoint, {list(v.shape)} here"
        for k, v in built.items()
        if k in saved and hasattr(v, "shape") and hasattr(saved[k], "shape") and saved[k].shape != v.shape
    ]
    missing, unexpected = sorted(set(built) - set(saved)), sorted(set(saved) - set(built))
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        problems.append(f"not in this model {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
    if not problems:
        return
    why = (
        f"settings that differ from the checkpoint's: {describe_changes(differences)}; set them as the checkpoint has "
        "them (see the config.yaml in its lightning_logs/version_N directory)"
        if differences
        else "no setting differs from the checkpoint's: was it written by another version of the code?"
    )
    raise UserError(f"--ckpt_path {ckpt_path} does not fit the model built here ({'; '.join(problems[:3])}): {why}")


def check_tokenizer_fits(tokenizer: str, tokenizer_vocab: int, model_vocab: int) -> None:
    """A tokenizer emitting ids beyond the model's vocabulary would index past its embedding table.
    `tokenizer`: how the user named it (`--tokenizer neox`, `tokenizer=neox`)."""
    if tokenizer_vocab > model_vocab:
        raise UserError(
            f"{tokenizer} has {tokenizer_vocab} tokens but the model's vocabulary has {model_vocab}: "
            "pass the tokenizer the model was trained with"
        )


def apply_optimizer_changes(checkpoint: dict[str, Any], hparams: dict[str, Any]) -> None:
    """Make a resumed run use the configured lr / weight decay / betas instead of the values in
    the optimizer state saved in `checkpoint` (which Lightning would restore over them).

    The LR schedule is a multiplier of the base lr, so the restored step's learning rate is
    rescaled by new/old: warmup and cosine continue from where they were, at the new peak.
    Prints one notice per changed setting (old -> new).
    """
    saved = checkpoint.get("hyper_parameters") or {}
    states = checkpoint.get("optimizer_states") or []
    if not states:
        return
    notices = []
    old_lr, new_lr = saved.get("lr"), hparams.get("lr")
    if old_lr is not None and new_lr is not None and float(old_lr) != float(new_lr):
        ratio = float(new_lr) / float(old_lr)
        for state in states:
            for group in state.get("param_groups", []):
                group["lr"] = group["lr"] * ratio
                if "initial_lr" in group:
                    group["initial_lr"] = float(new_lr)
        for scheduler in checkpoint.get("lr_schedulers") or []:
            if "base_lrs" in scheduler:
                scheduler["base_lrs"] = [float(new_lr)] * len(scheduler["base_lrs"])
            if "_last_lr" in scheduler:
                scheduler["_last_lr"] = [lr * ratio for lr in scheduler["_last_lr"]]
        notices.append(f"lr {old_lr} -> {new_lr}")
    old_wd, new_wd = saved.get("weight_decay"), hparams.get("weight_decay")
    if old_wd is not None and new_wd is not None and float(old_wd) != float(new_wd):
        for state in states:  # configure_optimizers: group 0 decays, group 1 (biases, norms) never does
            groups = state.get("param_groups", [])
            if groups:
                groups[0]["weight_decay"] = float(new_wd)
        notices.append(f"weight_decay {old_wd} -> {new_wd}")
    old_betas, new_betas = saved.get("betas"), hparams.get("betas")
    if old_betas is not None and new_betas is not None and list(old_betas) != list(new_betas):
        for state in states:
            for group in state.get("param_groups", []):
                group["betas"] = tuple(float(b) for b in new_betas)
        notices.append(f"betas {tuple(old_betas)} -> {tuple(new_betas)}")
    if notices:
        rank_zero_info(
            f"resuming with {', '.join(notices)}: applied to the optimizer state restored from the checkpoint"
        )
