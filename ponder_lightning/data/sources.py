"""Where documents come from: local Pile-format files, plain text files, or a hub dataset.

``resolve_sources`` turns the user's ``data_files`` strings into a fixed, ordered list of sources
(so the token stream, and therefore every batch, is reproducible), and every source yields its
documents as plain strings. Problems are reported as one-line ``UserError``s that name the file
(and line) at fault, because a bad shard deep inside a long run is otherwise hard to find.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from ponder_lightning.data.synthetic import PREFIX as SYNTHETIC_PREFIX
from ponder_lightning.data.synthetic import Compose, PointerChase, synthetic_source
from ponder_lightning.data.tokenizer import offline_variable
from ponder_lightning.errors import UserError, first_line

EMBEDDED_CORPUS = Path(__file__).resolve().parents[1] / "assets" / "corpus" / "cpython_docs.jsonl.zst"
SUFFIXES = (".jsonl", ".jsonl.zst", ".txt")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_READ_SIZE = 1 << 20


@dataclass(frozen=True)
class FileSource:
    """A local ``.jsonl`` / ``.jsonl.zst`` file of records, or a ``.txt`` file holding one document."""

    path: Path

    def fingerprint(self) -> list[Any]:
        """Changes whenever the file is replaced or rewritten, which invalidates its token cache."""
        stat = self.path.stat()
        return [str(self.path), stat.st_size, stat.st_mtime_ns]

    def documents(self, text_field: str) -> Iterator[str]:
        if self.path.name.endswith(".txt"):
            yield self._read_txt()
            return
        with open(self.path, "rb") as fh:
            chunks = (
                _zstd_chunks(fh, self.path)
                if self.path.name.endswith(".zst")
                else iter(lambda: fh.read(_READ_SIZE), b"")
            )
            for lineno, line in enumerate(_lines(chunks), start=1):
                if line.strip():
                    yield _record_text(line, self.path, lineno, text_field)

    def _read_txt(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8-sig")  # a byte-order mark is not text (as for .jsonl)
        except UnicodeDecodeError as exc:
            raise UserError(
                f"{self.path} is not valid UTF-8 text ({exc.reason} at byte {exc.start}): re-encode it as UTF-8"
            ) from exc


@dataclass(frozen=True)
class HubSource:
    """A Hugging Face dataset's ``train`` split, downloaded through ``datasets`` (online only)."""

    name: str
    dataset: Any

    def fingerprint(self) -> list[Any]:
        return ["hub", self.name, self.dataset._fingerprint]

    def documents(self, text_field: str) -> Iterator[str]:
        if text_field not in self.dataset.column_names:
            raise UserError(
                f"hub dataset '{self.name}' has no field '{text_field}' "
                f"(columns: {', '.join(self.dataset.column_names)}): set --data.text_field"
            )
        for batch in self.dataset.iter(batch_size=1000):
            yield from batch[text_field]


Source = FileSource | HubSource | PointerChase | Compose


def embedded_corpus() -> list[Source]:
    """The CPython documentation corpus shipped inside the package (see assets/NOTICE)."""
    return [FileSource(EMBEDDED_CORPUS)]


def resolve_sources(specs: str | list[str]) -> list[Source]:
    """Expand paths, directories and globs in order (each glob sorted), dropping repeated files."""
    sources: list[Source] = []
    for spec in [specs] if isinstance(specs, str) else list(specs):
        for source in _resolve_one(str(spec)):
            if source not in sources:
                sources.append(source)
    return sources


def check_disjoint(train: list[Source], val: list[Source]) -> None:
    """Refuse validation sources that are also training sources (a directory of training data
    searched recursively easily contains the validation file): their scores would be on trained-on
    text. The very same sources for both are allowed: `evaluate --data_files` scores a model on
    files of the user's choice that way, and nothing is hidden there."""
    shared = [source for source in val if source in train]
    if shared and train != val:
        raise UserError(
            f"data.val_files {describe(shared)} {'is' if len(shared) == 1 else 'are'} also in data.data_files: "
            "validation on trained-on documents is meaningless; move the validation files out of the training "
            "data (or narrow data.data_files to a glob that excludes them)"
        )


def iter_documents(sources: list[Source], text_field: str = "text") -> Iterator[str]:
    """Every document of every source, in order: the input of ``encode_documents``."""
    for source in sources:
        yield from source.documents(text_field)


def describe(sources: list[Source]) -> str:
    """A short human description for error messages."""
    names = [
        str(s.path)
        if isinstance(s, FileSource)
        else s.name
        if isinstance(s, PointerChase | Compose)
        else f"hub:{s.name}"
        for s in sources
    ]
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def _resolve_one(spec: str) -> list[Source]:
    if spec.startswith(SYNTHETIC_PREFIX):  # generated documents with known difficulty (data/synthetic.py)
        return [synthetic_source(spec)]
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
        if not files:
            raise UserError(
                f"data directory {path} holds no {', '.join(SUFFIXES)} files: point data_files at the data itself"
            )
        return [FileSource(p.resolve()) for p in files]
    if path.is_file():
        return [_file_source(path)]
    matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(spec), recursive=True)) if Path(m).is_file()]
    if matches:
        return [_file_source(m) for m in matches]
    if _HUB_NAME.match(spec) and not spec.endswith(SUFFIXES + (".json", ".zst")):
        return [_hub_source(spec)]
    raise UserError(f"data file/glob {spec} matched no files: check the path (relative paths start at {Path.cwd()})")


def _file_source(path: Path) -> FileSource:
    if not path.name.endswith(SUFFIXES):
        raise UserError(f"data file {path} has an unsupported type: use .jsonl, .jsonl.zst (Pile format) or .txt files")
    return FileSource(path.resolve())


def _hub_source(name: str) -> HubSource:
    offline = offline_variable("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    if offline:
        raise UserError(
            f"data_files '{name}' is not a local file and {offline}=1 forbids fetching it as a hub dataset: "
            "download the files and pass their local paths or a glob"
        )
    import datasets  # heavy import, only needed for hub data

    try:
        return HubSource(name, datasets.load_dataset(name, split="train"))
    except Exception as exc:  # noqa: BLE001 - datasets raises many unrelated types
        raise UserError(
            f"hub dataset '{name}' could not be loaded ({first_line(exc)}): check the name, or pass local files"
        ) from exc


def _zstd_chunks(fh: BinaryIO, path: Path) -> Iterator[bytes]:
    """Decompress frame by frame, so a truncated download is an error instead of silently short data."""
    dctx = zstandard.ZstdDecompressor()
    frame = None
    try:
        while chunk := fh.read(_READ_SIZE):
            while chunk:
                if frame is None:
                    frame = dctx.decompressobj()
                if out := frame.decompress(chunk):
                    yield out
                chunk, frame = (frame.unused_data, None) if frame.eof else (b"", frame)
    except zstandard.ZstdError as exc:
        raise UserError(f"{path} is not valid zstd data ({exc}): re-download or re-compress the file") from exc
    if frame is not None:
        raise UserError(f"{path} is truncated (its last zstd frame is incomplete): re-download the file")


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Split a byte stream on newlines without re-copying long lines for every chunk."""
    pending: list[bytes] = []
    for chunk in chunks:
        *complete, rest = chunk.split(b"\n")
        if complete:
            yield b"".join([*pending, complete[0]])
            yield from complete[1:]
            pending = []
        pending.append(rest)
    if tail := b"".join(pending):
        yield tail


def _record_text(line: bytes, path: Path, lineno: int, text_field: str) -> str:
    try:
        record = json.loads(line)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise UserError(f"{path}:{lineno}: invalid JSON line ({exc}): each line must be one JSON object") from exc
    if not isinstance(record, dict) or text_field not in record:
        raise UserError(
            f"{path}:{lineno}: record has no '{text_field}' field: use Pile-format records "
            f'{{"{text_field}": ...}} or set --data.text_field'
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise UserError(f"{path}:{lineno}: field '{text_field}' is {type(text).__name__}, expected a string")
    return text
