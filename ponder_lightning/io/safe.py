"""Read checkpoints without running the code a pickle can carry.

A `.ckpt` is a pickle, and unpickling can call any function the file names (`os.system` through
`__reduce__`), before any check of what the file holds. Researchers download and share
checkpoints, so every read here uses torch's `weights_only=True` unpickler (tensors and plain
data only). What the library writes is plain data already: hyperparameters as the CLI records
them (class paths and init arguments), loop and sampler state as numbers.

A sharded (FSDP) checkpoint directory is read by `torch.distributed.checkpoint`, which unpickles
its `.metadata` and its non-tensor items with the unrestricted unpickler: `verify_sharded` reads
them first with the restricted one and refuses the directory if anything else is in them.

A file holding other objects (a model built in Python whose hyperparameters are gate objects)
loads only with an explicit opt-in (`trusted=True`, `--trust_checkpoint` on the command line),
with the warning torch itself gives.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from ponder_lightning.errors import UserError, first_line
from ponder_lightning.training import LAST_GOOD

#: The flag that opts in to reading a checkpoint with the unrestricted unpickler.
TRUST_FLAG = "--trust_checkpoint"
#: What DCP's `.metadata` pickles: its own dataclasses, tensor sizes, dtypes and layouts, paths.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata",)
_DCP_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}
_METADATA_FILE = ".metadata"


class UnsafeCheckpoint(UserError):
    """A checkpoint whose pickle names objects beyond tensors and plain data."""


def torch_load(path: str | Path, *, trusted: bool = False, **kwargs: Any) -> Any:
    """`torch.load(path, weights_only=True)`, with one clear error for a file that needs more (and
    for a damaged one); `trusted=True` reads it with the unrestricted unpickler, after a warning."""
    if trusted:
        warnings.warn(
            f"reading {path} with weights_only=False ({TRUST_FLAG}): it can run arbitrary code; "
            "do it only for a file from a trusted source",
            stacklevel=2,
        )
        return torch.load(path, map_location="cpu", weights_only=False, **kwargs)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - unpickling raises many types for a damaged file
        if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in str(exc):
            raise unsafe(path, _weights_only_reason(exc)) from None
        good = Path(path).with_name(LAST_GOOD)
        hint = f": resume from the healthy one beside it, --ckpt_path {good}" if good.is_file() else ""
        raise UserError(
            f"checkpoint {path} could not be read ({first_line(exc)}): it is damaged or not a PyTorch checkpoint{hint}"
        ) from exc


def unsafe(path: str | Path, reason: str) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(
        f"checkpoint {path} holds more than tensors and plain data ({reason}), and reading it could run code: "
        f"it was not read. If you trust its source, pass {TRUST_FLAG} (Python: load_checkpoint(path, trusted=True))"
    )


def _weights_only_reason(exc: BaseException) -> str:
    """torch's many-line weights_only refusal, cut to the global it refused."""
    text = str(exc)
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("WeightsUnpickler error:"):
            return line.removeprefix("WeightsUnpickler error:").strip().split(". ")[0]
    return first_line(exc)


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES or (module, name) in _DCP_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not what a checkpoint's metadata holds")


def verify_sharded(path: str | Path) -> None:
    """Refuse a sharded checkpoint directory whose metadata or non-tensor items name code (see
    the module docstring); the tensors themselves DCP reads with `weights_only=True`."""
    path = Path(path)
    try:
        with open(path / _METADATA_FILE, "rb") as fh:
            metadata = _DCPMetadataUnpickler(fh).load()
    except pickle.UnpicklingError as exc:
        raise unsafe(path / _METADATA_FILE, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a damaged file
        raise UserError(f"checkpoint {path} could not be read ({first_line(exc)}): it is damaged") from exc
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        if getattr(info, "transform_descriptors", None):
            raise unsafe(path, f"{index.fqn} is stored with transforms this check cannot read")
        with open(path / info.relative_path, "rb") as fh:
            fh.seek(info.offset)
            blob = io.BytesIO(fh.read(info.length))
        try:
            torch.load(blob, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise unsafe(path, f"{index.fqn}: {_weights_only_reason(exc)}") from None
    extra = path / "meta.pt"  # Lightning's non-tensor part of the checkpoint
    if extra.is_file():
        torch_load(extra)
