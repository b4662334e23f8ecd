"""``python -m ponder_lightning prepare``: tokenise Pile-format files once into token shards.

    python -m ponder_lightning prepare --data_files 'pile/train/*.jsonl.zst' --out data/pile_tokens
    python -m ponder_lightning fit --config configs/adaponderlm.yaml --data.tokens data/pile_tokens

Each input file becomes one shard, ``parts/<hash of its path>.bin``, written by a pool of worker
processes (one file per worker at a time). A worker commits its progress every few million tokens:
it flushes the shard to disk, then records (documents, tokens) done in ``<shard>.progress.json``.
An interrupted run (Ctrl-C, a killed job) therefore resumes where each file stopped: the shard is
cut back to the last commit and the documents before it are skipped (decompressed, not
re-tokenised). A finished shard is renamed to its final name with a ``.json`` of its counts, and
``meta.json`` (the token-shard format of ``shards.py``) is written last, listing the shards in
input order, so the token stream is exactly what on-the-fly tokenisation of the same files gives.
Shards of files that changed since (size or mtime) are redone.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing
import os
import queue as queue_module
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ponder_lightning.data.shards import token_dtype, write_json_atomic, write_meta
from ponder_lightning.data.sources import FileSource, resolve_sources
from ponder_lightning.data.tokenized import encode_documents
from ponder_lightning.data.tokenizer import load_tokenizer
from ponder_lightning.errors import UserError
from ponder_lightning.validation import check_writable_dir

PREPARE_FILE = "prepare.json"
PARTS = "parts"
COMMIT_TOKENS = 1 << 24  # flush + record progress every ~16M tokens (32 MiB of uint16)
_REPORT_DOCS = 256

_progress_queue: Any = None  # set in each worker process by _init_worker


def prepare_tokens(
    data_files: str | list[str],
    out: str | Path,
    tokenizer: str = "neox",
    text_field: str = "text",
    workers: int | None = None,
    progress: bool = True,
    commit_tokens: int = COMMIT_TOKENS,
) -> dict[str, Any]:
    """Tokenise ``data_files`` into the token-shard directory ``out`` (resuming what an earlier
    call left); returns the written ``meta.json`` contents."""
    out = Path(out).expanduser()
    sources = resolve_sources(data_files)
    not_files = [s for s in sources if not isinstance(s, FileSource)]
    if not_files:
        raise UserError(
            f"prepare reads local files only, not hub dataset '{not_files[0].name}': download its files and pass "
            "them, or train with --data.data_files, which tokenises into the cache"
        )
    tok = load_tokenizer(tokenizer)
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    _check_or_write_plan(out, {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "text_field": text_field})
    dtype = token_dtype(tok.vocab_size)
    parts = [(source.path, _part_stem(source.path)) for source in sources]
    todo = [(path, stem) for path, stem in parts if _finished_part(out, path, stem, dtype) is None]
    jobs = [(str(path), str(out / PARTS / stem), tokenizer, text_field, dtype, commit_tokens) for path, stem in todo]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    bar = _progress_bar(progress, len(parts), len(parts) - len(todo))
    try:
        if workers == 1:
            _run_in_process(jobs, bar)
        else:
            _run_in_pool(jobs, workers, bar)
    finally:
        if bar is not None:
            bar.close()
    counts = [_finished_part(out, path, stem, dtype) for path, stem in parts]
    return write_meta(
        out,
        tok,
        num_tokens=sum(c["num_tokens"] for c in counts),
        num_docs=sum(c["num_docs"] for c in counts),
        shards=[f"{PARTS}/{stem}.bin" for _, stem in parts],
        sources=[str(path) for path, _ in parts],
    )


def prepare_command(argv: list[str]) -> None:
    """`prepare --data_files GLOB [...] --out DIR`: tokenise Pile-format files into uint16 token
    shards (in parallel, resumable) for `fit --data.tokens DIR`."""
    parser = argparse.ArgumentParser(prog="python -m ponder_lightning prepare", description=prepare_command.__doc__)
    parser.add_argument(
        "--data_files", nargs="+", required=True, help="*.jsonl / *.jsonl.zst / *.txt files, directories or globs"
    )
    parser.add_argument("--out", required=True, help="output directory (re-run the same command to resume)")
    parser.add_argument(
        "--tokenizer", default="neox", help="neox (default), bytes, or a local tokenizer file/directory"
    )
    parser.add_argument("--text_field", default="text", help="JSON field holding the document text")
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: CPU count, at most one per file)"
    )
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers={args.workers} is invalid: use at least 1")
    try:  # before any file is read
        check_writable_dir(Path(args.out).expanduser())
    except ValueError as err:
        raise UserError(f"--out {args.out}: {err}") from None
    meta = prepare_tokens(
        args.data_files, args.out, args.tokenizer, args.text_field, args.workers, not args.no_progress
    )
    print(
        f"wrote {meta['num_tokens']:,} tokens from {meta['num_docs']:,} documents in {len(meta['shards'])} shards to "
        f"{args.out}; train with --data.tokens {args.out} --data.tokenizer {args.tokenizer}"
    )


# -- the output directory ----------------------------------------------------------------------


def _part_stem(path: Path) -> str:
    """Shard name of an input file: stable across runs and independent of the file list's order."""
    return f"{path.name.split('.')[0][:40]}-{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"


def _check_or_write_plan(out: Path, plan: dict[str, Any]) -> None:
    """Refuse to mix shards of different tokenizers (or text fields) in one directory."""
    plan_file = out / PREPARE_FILE
    if plan_file.is_file():
        try:
            old = json.loads(plan_file.read_text())
        except ValueError:
            old = None
        if old != plan:
            raise UserError(
                f"{out} holds tokens prepared with different settings ({old}) than now ({plan}): use another --out "
                "directory, or delete this one to start over"
            )
        return
    write_json_atomic(plan_file, plan)


def _finished_part(out: Path, path: Path, stem: str, dtype: str) -> dict[str, Any] | None:
    """The counts of a finished shard of `path`, or None if it must be (re)done."""
    counts_file, shard = out / PARTS / f"{stem}.json", out / PARTS / f"{stem}.bin"
    try:
        counts = json.loads(counts_file.read_text())
    except (OSError, ValueError):
        return None
    fresh = counts.get("fingerprint") == FileSource(path).fingerprint()
    if fresh and shard.is_file() and shard.stat().st_size == counts["num_tokens"] * np.dtype(dtype).itemsize:
        return counts
    return None


# -- running the parts -------------------------------------------------------------------------


def _progress_bar(enabled: bool, files: int, done: int) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    bar = tqdm(unit=" docs", unit_scale=True, desc="tokenising", dynamic_ncols=True, file=sys.stderr)
    bar.files, bar.files_done, bar.tokens = files, done, 0
    bar.set_postfix_str(f"files {done}/{files}")
    return bar


def _advance(bar: Any, docs: int, tokens: int, finished: bool) -> None:
    if bar is None:
        return
    bar.tokens += tokens
    bar.files_done += finished
    bar.set_postfix_str(f"files {bar.files_done}/{bar.files}, {bar.tokens:,} tokens", refresh=False)
    bar.update(docs)


def _run_in_process(jobs: list[tuple], bar: Any) -> None:
    global _progress_queue
    for job in jobs:
        _progress_queue = _Direct(bar)
        try:
            _prepare_part(*job)
        finally:
            _progress_queue = None


class _Direct:
    """Progress reports straight to the bar (single-process runs)."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def put(self, item: tuple[int, int, bool]) -> None:
        _advance(self.bar, *item)


def _run_in_pool(jobs: list[tuple], workers: int, bar: Any) -> None:
    # fork: workers start at once (no re-import); the parent has not used the tokenizer yet.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    reports = context.Queue()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(reports,)) as pool:
        futures: list[Future] = [pool.submit(_prepare_part, *job) for job in jobs]
        while True:
            _drain(reports, bar, timeout=0.2)
            if all(f.done() for f in futures):
                break
        _drain(reports, bar, timeout=0)
        for f in futures:
            f.result()  # re-raise a worker's error (a UserError naming the bad file and line)


def _drain(reports: Any, bar: Any, timeout: float) -> None:
    try:
        item = reports.get(timeout=timeout) if timeout else reports.get_nowait()
        while True:
            _advance(bar, *item)
            item = reports.get_nowait()
    except queue_module.Empty:
        pass


def _init_worker(reports: Any) -> None:
    global _progress_queue
    _progress_queue = reports
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already


def _prepare_part(source: str, part: str, tokenizer_spec: str, text_field: str, dtype: str, commit_tokens: int) -> None:
    """Tokenise one file into `<part>.bin`, resuming from `<part>.progress.json` if present."""
    path, part_path = Path(source), Path(part)
    tok = load_tokenizer(tokenizer_spec)
    fingerprint = FileSource(path).fingerprint()
    partial, progress_file = part_path.with_suffix(".bin.partial"), part_path.with_suffix(".progress.json")
    itemsize = np.dtype(dtype).itemsize
    done = _read_progress(progress_file, fingerprint)
    if done is None or not partial.is_file() or partial.stat().st_size < done["tokens"] * itemsize:
        done = {"fingerprint": fingerprint, "docs": 0, "tokens": 0}
        partial.write_bytes(b"")
    eos = np.array([tok.eos_id], dtype=dtype)
    docs, tokens, uncommitted, unreported = done["docs"], done["tokens"], 0, [0, 0]
    with open(partial, "r+b") as fh:
        fh.truncate(tokens * itemsize)  # drop whatever was written after the last commit
        fh.seek(0, os.SEEK_END)
        texts = itertools.islice(FileSource(path).documents(text_field), docs, None)
        for ids in encode_documents(texts, tok):
            fh.write(np.asarray(ids, dtype=dtype).tobytes() + eos.tobytes())
            docs, tokens = docs + 1, tokens + len(ids) + 1
            uncommitted += len(ids) + 1
            unreported[0] += 1
            unreported[1] += len(ids) + 1
            if unreported[0] >= _REPORT_DOCS:
                _report(unreported)
            if uncommitted >= commit_tokens:
                _commit(fh, progress_file, {"fingerprint": fingerprint, "docs": docs, "tokens": tokens})
                uncommitted = 0
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, part_path.with_suffix(".bin"))
    counts = {"fingerprint": fingerprint, "num_docs": docs, "num_tokens": tokens}
    write_json_atomic(part_path.with_suffix(".json"), counts)
    progress_file.unlink(missing_ok=True)
    _report(unreported, finished=True)


def _read_progress(progress_file: Path, fingerprint: list[Any]) -> dict[str, Any] | None:
    try:
        done = json.loads(progress_file.read_text())
    except (OSError, ValueError):
        return None
    return done if done.get("fingerprint") == fingerprint else None


def _commit(fh: Any, progress_file: Path, done: dict[str, Any]) -> None:
    """Make the tokens so far durable, then record them: a crash between the two only loses work."""
    fh.flush()
    os.fsync(fh.fileno())
    write_json_atomic(progress_file, done)


def _report(unreported: list[int], finished: bool = False) -> None:
    if _progress_queue is not None:
        _progress_queue.put((unreported[0], unreported[1], finished))
    unreported[0] = unreported[1] = 0
