"""Tokenise a set of sources once and keep the token stream in an on-disk cache.

Tokenising the Pile is slow, so the stream is written to
``<cache_dir>/tokens/<key>/`` in the token-shard format (see ``shards.py``) and memory-mapped on
later runs. The key hashes everything that changes the tokens: each file's resolved path, size and
mtime (or a hub dataset's fingerprint), the tokenizer's identity and the text field. The
train/validation split is *not* part of the key: it is applied to the cached stream at load time
(see ``packing.split_documents``), so changing ``val_fraction`` never re-tokenises. The cache
entry is built in a temporary directory and renamed into place, so concurrent or interrupted runs
never see a partial entry.

Lightning-free (only the DataModule imports Lightning): progress lines go to ``log``, which the
DataModule sets to Lightning's rank-zero logger; by default this module's ``logging`` logger.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ponder_lightning.data.shards import META_FILE, TokenStream, load_token_shards, write_token_shards
from ponder_lightning.data.sources import Source, describe, iter_documents
from ponder_lightning.data.tokenizer import Tokenizer

CACHE_VERSION = 1
ENCODE_BATCH_DOCS = 256


def default_cache_dir() -> Path:
    """``$PONDER_CACHE`` if set, else ``~/.cache/ponder_lightning``."""
    return Path(os.environ.get("PONDER_CACHE") or Path.home() / ".cache" / "ponder_lightning").expanduser()


def encode_documents(texts: Iterable[str], tokenizer: Tokenizer) -> Iterator[list[int]]:
    """Token ids per document, encoded in batches so fast tokenizers can work in parallel."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == ENCODE_BATCH_DOCS:
            yield from tokenizer.encode_batch(batch)
            batch = []
    if batch:
        yield from tokenizer.encode_batch(batch)


def cache_key(sources: list[Source], tokenizer: Tokenizer, text_field: str) -> str:
    identity = {
        "version": CACHE_VERSION,
        "sources": [s.fingerprint() for s in sources],
        "tokenizer": tokenizer.name,
        "text_field": text_field,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:24]


def cached_token_stream(
    sources: list[Source],
    tokenizer: Tokenizer,
    text_field: str,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[TokenStream, int]:
    """The EOS-separated token stream of ``sources`` and its document count, tokenising on a miss
    (saying so through ``log``, default: this module's logger at INFO)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    entry = root / "tokens" / cache_key(sources, tokenizer, text_field)
    if not (entry / META_FILE).is_file():
        _build(entry, sources, tokenizer, text_field, log or logging.getLogger(__name__).info)
    return load_token_shards(entry, tokenizer)


def _build(
    entry: Path, sources: list[Source], tokenizer: Tokenizer, text_field: str, log: Callable[[str], None]
) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    log(f"Tokenising {describe(sources)} with {tokenizer.name} into {entry} ...")
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".tmp-", dir=entry.parent))
    try:
        meta = write_token_shards(tmp, encode_documents(iter_documents(sources, text_field), tokenizer), tokenizer)
        (tmp / "sources.json").write_text(json.dumps([s.fingerprint() for s in sources], indent=1) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a shared cache must stay readable
        if entry.exists() and not (entry / META_FILE).is_file():
            shutil.rmtree(entry)  # damaged by hand (meta.json deleted): rebuild it
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / META_FILE).is_file():  # not just another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"Cached {meta['num_tokens']:,} tokens from {meta['num_docs']:,} documents")
