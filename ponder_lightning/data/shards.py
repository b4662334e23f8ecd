"""The on-disk token format shared by the token cache and by pre-tokenised datasets.

A token-shard directory holds raw little-endian token ids and a ``meta.json``::

    meta.json        {"format": "ponder_lightning.token_shards", "version": 1,
                      "tokenizer": "neox:<sha1>", "vocab_size": 50277, "eos_id": 0,
                      "dtype": "uint16", "num_tokens": 123456, "num_docs": 789,
                      "shards": ["shard_00000.bin", ...]}
    shard_00000.bin  uint16 (uint32 when vocab_size > 65536) token ids, no header

Concatenating the shards in ``shards`` order gives one stream in which every document is followed
by ``eos_id``; documents may straddle shard boundaries. Only ``tokenizer``, ``vocab_size`` and
``dtype`` are required: without ``shards`` all ``*.bin`` files are used in name order, without
``num_docs`` the EOS tokens are counted. The format is plain so other tools (numpy.memmap,
Megatron-style loaders) can read it, and the shards are memory-mapped so datasets of any size
load instantly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ponder_lightning.data.tokenizer import Tokenizer
from ponder_lightning.errors import UserError

META_FILE = "meta.json"
FORMAT = "ponder_lightning.token_shards"
DTYPES = ("uint16", "uint32")
DEFAULT_SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard
_WRITE_TOKENS = 1 << 22  # flush to disk every ~4M tokens
_SCAN_TOKENS = 1 << 24


def token_dtype(vocab_size: int) -> str:
    """The narrowest dtype that holds every id: uint16 covers GPT-NeoX's 50277 ids."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class TokenStream:
    """A read-only window ``[start, stop)`` over the concatenation of shard files.

    Files are memory-mapped on first use and the maps are dropped when pickled, so a stream
    travels cheaply to DataLoader worker processes.
    """

    def __init__(self, files: Sequence[Path], dtype: str, start: int = 0, stop: int | None = None) -> None:
        self.files = tuple(files)
        self.dtype = np.dtype(dtype)
        sizes = [os.path.getsize(f) // self.dtype.itemsize for f in self.files]
        self._offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.start = start
        self.stop = int(self._offsets[-1]) if stop is None else stop
        self._maps: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return self.stop - self.start

    def window(self, lo: int, hi: int) -> TokenStream:
        """A sub-stream over ``[lo, hi)`` of this stream, sharing its files."""
        return TokenStream(self.files, self.dtype.name, self.start + lo, self.start + hi)

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Tokens ``[lo, hi)`` of this stream as a fresh array (may span several shards)."""
        lo, hi = self.start + lo, self.start + min(hi, len(self))
        if self._maps is None:
            self._maps = [
                np.memmap(f, dtype=self.dtype, mode="r") if os.path.getsize(f) else np.empty(0, self.dtype)
                for f in self.files
            ]
        parts = []
        first = int(np.searchsorted(self._offsets, lo, side="right")) - 1
        for i in range(max(first, 0), len(self.files)):
            a, b = max(lo, self._offsets[i]), min(hi, self._offsets[i + 1])
            if a >= hi:
                break
            if a < b:
                parts.append(self._maps[i][a - self._offsets[i] : b - self._offsets[i]])
        return np.concatenate(parts) if parts else np.empty(0, self.dtype)

    def chunks(self, size: int = _SCAN_TOKENS, reverse: bool = False) -> Iterable[tuple[int, np.ndarray]]:
        """``(offset, tokens)`` pieces covering the stream, for scans that must not load it whole."""
        starts = range(0, len(self), size)
        for lo in reversed(starts) if reverse else starts:
            yield lo, self.read(lo, lo + size)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}


def write_token_shards(
    out_dir: str | Path,
    documents: Iterable[Sequence[int] | np.ndarray],
    tokenizer: Tokenizer,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> dict[str, Any]:
    """Write tokenised ``documents`` (EOS is appended to each) as shards in ``out_dir``.

    Each shard is written under a temporary name and renamed when full, and ``meta.json`` is
    written last, so an interrupted run never leaves a directory that loads as complete.
    Returns the meta dict.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    writer = _ShardWriter(out, shard_tokens)
    buffer: list[np.ndarray] = []
    buffered = num_docs = 0
    for doc in documents:
        buffer += [np.asarray(doc, dtype=dtype), eos]
        buffered += len(doc) + 1
        num_docs += 1
        if buffered >= _WRITE_TOKENS:
            writer.write(np.concatenate(buffer))
            buffer, buffered = [], 0
    if buffer:
        writer.write(np.concatenate(buffer))
    writer.close()
    return write_meta(out, tokenizer, writer.num_tokens, num_docs, writer.shards)


def write_meta(
    out: Path, tokenizer: Tokenizer, num_tokens: int, num_docs: int, shards: list[str], **extra: Any
) -> dict[str, Any]:
    """Write (atomically) and return the ``meta.json`` of a shard directory whose shards are all
    written: the last step, so a directory with a meta.json is complete. ``extra``: more fields."""
    meta = {
        "format": FORMAT,
        "version": 1,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "dtype": token_dtype(tokenizer.vocab_size),
        "num_tokens": num_tokens,
        "num_docs": num_docs,
        "shards": shards,
        **extra,
    }
    write_json_atomic(out / META_FILE, meta)
    return meta


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON under a temporary name, then rename: a reader sees the old file or the new one,
    never half of one (also after a crash)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class _ShardWriter:
    """Appends tokens to ``shard_NNNNN.bin`` files of at most ``shard_tokens`` tokens each."""

    def __init__(self, out: Path, shard_tokens: int) -> None:
        self.out, self.shard_tokens = out, shard_tokens
        self.shards: list[str] = []
        self.num_tokens = self._in_shard = 0
        self._handle: BinaryIO | None = None

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self._handle is None:
                self.shards.append(f"shard_{len(self.shards):05d}.bin")
                self._handle, self._in_shard = open(self.out / (self.shards[-1] + ".tmp"), "wb"), 0  # noqa: SIM115
            take = min(tokens.size, self.shard_tokens - self._in_shard)
            self._handle.write(tokens[:take].tobytes())
            tokens, self._in_shard, self.num_tokens = tokens[take:], self._in_shard + take, self.num_tokens + take
            if self._in_shard == self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            os.replace(self._handle.name, self.out / self.shards[-1])
            self._handle = None


def load_token_shards(path: str | Path, tokenizer: Tokenizer) -> tuple[TokenStream, int]:
    """Open a shard directory (or one shard file) made with ``tokenizer``; returns (stream, num_docs)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(
            f"tokens path {path} does not exist: write it with write_token_shards / `prepare`, or pass data_files"
        )
    meta_path = (path if path.is_dir() else path.parent) / META_FILE
    meta = _read_meta(meta_path)
    if meta["tokenizer"] != tokenizer.name or meta["vocab_size"] != tokenizer.vocab_size:
        raise UserError(
            f"{meta_path}: tokens were made with tokenizer '{meta['tokenizer']}' (vocab {meta['vocab_size']}) but the "
            f"configured tokenizer is '{tokenizer.name}' (vocab {tokenizer.vocab_size}): use the same --data.tokenizer "
            "or re-tokenise the data"
        )
    if not path.is_dir():
        files = [path]
    elif isinstance(meta.get("shards"), list):  # may be empty: a validly written, empty stream
        files = [path / name for name in meta["shards"]]
    else:
        files = sorted(path.glob("*.bin"))
        if not files:
            raise UserError(f"{path} holds no .bin token shards: write them with write_token_shards / `prepare`")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for f in files:
        if not f.is_file():
            raise UserError(f"token shard {f} listed in {meta_path} is missing: re-create the token directory")
        if f.stat().st_size % itemsize:
            raise UserError(
                f"token shard {f} is corrupt: {f.stat().st_size} bytes is not a multiple of {itemsize} "
                f"({meta['dtype']}): re-create the token directory"
            )
    stream = TokenStream(files, meta["dtype"])
    whole_dir = path.is_dir() and isinstance(meta.get("num_docs"), int)
    return stream, meta["num_docs"] if whole_dir else count_tokens(stream, tokenizer.eos_id)


def count_tokens(stream: TokenStream, token_id: int) -> int:
    """How often ``token_id`` occurs, scanning in bounded-memory chunks."""
    return sum(int(np.count_nonzero(chunk == token_id)) for _, chunk in stream.chunks())


def _read_meta(meta_path: Path) -> dict[str, Any]:
    if not meta_path.is_file():
        raise UserError(
            f"{meta_path} is missing: token shards need the meta.json written by write_token_shards / `prepare`"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise UserError(f"{meta_path} is not valid JSON ({exc}): re-create the token directory") from exc
    for key, kind in (("tokenizer", str), ("vocab_size", int), ("dtype", str)):
        if not isinstance(meta, dict) or not isinstance(meta.get(key), kind):
            raise UserError(f"{meta_path} lacks a valid '{key}' field: re-create the token directory")
    if meta["dtype"] not in DTYPES:
        raise UserError(f"{meta_path}: dtype '{meta['dtype']}' is not one of {', '.join(DTYPES)}")
    return meta
