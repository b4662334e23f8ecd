"""Read Megatron / GPT-NeoX ``MMapIndexedDataset`` files (``.bin`` + ``.idx``) with numpy alone.

This is the format of Pythia's published pre-tokenised Pile (e.g. ``pile_0.87_deduped_text_document``,
or EleutherAI/pile-standard-pythia-preshuffled, whose ``.bin`` comes split into
``document-00000-of-00020.bin`` ... parts next to one ``document.idx``; the parts are read in order,
no need to concatenate them). ``--data.tokens`` accepts a path prefix, the ``.idx`` or ``.bin``
file, or a directory of such pairs.

Index layout (little-endian)::

    magic    b"MMIDIDX\\x00\\x00"        9 bytes
    version  uint64 (= 1)
    dtype    uint8 code of the token dtype (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16)
    count    uint64  number of sequences
    docs     uint64  length of doc_idx
    sizes    int32[count]     tokens per sequence
    pointers int64[count]     byte offset of each sequence in the .bin
    doc_idx  int64[docs]      sequence index where each document starts (plus the end)

The ``.bin`` is the raw tokens of all sequences back to back, so it *is* a token stream and is
memory-mapped as such. Sequences are documents with EOS appended (``--append-eod``, as Pythia's
data was made); the reader checks that on a sample, since the train/validation split and packing
rely on it. The files record no tokenizer: ``--data.tokenizer`` must be the one they were made
with (``neox`` for Pythia); token ids beyond its vocabulary are reported on a sample.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ponder_lightning.data.shards import META_FILE, TokenStream
from ponder_lightning.data.tokenizer import Tokenizer
from ponder_lightning.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, count, docs
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_SAMPLE = 1000


@dataclass
class MegatronIndex:
    path: Path
    dtype: np.dtype
    sizes: np.ndarray  # int32[count], memory-mapped
    pointers: np.ndarray  # int64[count]
    doc_idx: np.ndarray  # int64[docs]

    @property
    def num_tokens(self) -> int:
        if not len(self.sizes):
            return 0
        return int(self.pointers[-1]) // self.dtype.itemsize + int(self.sizes[-1])


def read_index(path: str | Path) -> MegatronIndex:
    """Parse a ``.idx`` file (arrays are memory-mapped, so this is instant for the full Pile)."""
    path = Path(path)
    with open(path, "rb") as fh:
        raw = fh.read(HEADER.size)
    if len(raw) < HEADER.size or raw[:9] != MAGIC:
        raise UserError(f"{path} is not a Megatron index (.idx): it does not start with {MAGIC!r}")
    _, version, code, count, docs = HEADER.unpack(raw)
    if version != 1:
        raise UserError(f"{path}: Megatron index version {version} is not supported (only 1)")
    if code not in DTYPE_CODES:
        raise UserError(f"{path}: dtype code {code} is not an integer token type ({sorted(DTYPE_CODES)})")
    expected = HEADER.size + count * 4 + count * 8 + docs * 8
    if path.stat().st_size != expected:
        raise UserError(
            f"{path} is corrupt: {path.stat().st_size} bytes, but its header ({count} sequences, {docs} doc_idx "
            f"entries) needs {expected}: re-download it"
        )
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    sizes = np.frombuffer(buf, np.int32, count, HEADER.size)
    pointers = np.frombuffer(buf, np.int64, count, HEADER.size + count * 4)
    doc_idx = np.frombuffer(buf, np.int64, docs, HEADER.size + count * 12)
    return MegatronIndex(path, np.dtype(DTYPE_CODES[code]), sizes, pointers, doc_idx)


def is_megatron(path: str | Path) -> bool:
    """Whether `--data.tokens path` names Megatron data (rather than our token-shard directory)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return not (p / META_FILE).is_file() and any(p.glob("*.idx"))
    if p.suffix in (".idx", ".bin"):
        return p.with_suffix(".idx").is_file()
    return not p.exists() and Path(str(p) + ".idx").is_file()


def load_megatron(path: str | Path, tokenizer: Tokenizer) -> tuple[TokenStream, int]:
    """(token stream, number of documents) of the Megatron dataset(s) at `path`."""
    files, num_docs, dtype = [], 0, None
    for idx_path in _index_files(Path(path).expanduser()):
        index = read_index(idx_path)
        if dtype is not None and index.dtype != dtype:
            raise UserError(
                f"{idx_path} stores {index.dtype} tokens but an earlier index stores {dtype}: use one dtype"
            )
        dtype = index.dtype
        bins = _bin_files(idx_path)
        _check_sizes(index, bins)
        _check_sample(index, TokenStream(bins, index.dtype.name), tokenizer)
        files += bins
        num_docs += max(len(index.doc_idx) - 1, 0) if len(index.doc_idx) else len(index.sizes)
    return TokenStream(files, dtype.name), num_docs


def _index_files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(path.glob("*.idx"))
        if not found:
            raise UserError(f"{path} holds no Megatron .idx files")
        return found
    if path.suffix in (".idx", ".bin"):
        return [path.with_suffix(".idx")]
    if Path(str(path) + ".idx").is_file():
        return [Path(str(path) + ".idx")]
    raise UserError(f"Megatron data {path} not found: pass the path prefix, its .idx/.bin file, or their directory")


def _bin_files(idx_path: Path) -> list[Path]:
    """`prefix.bin`, or its parts `prefix-00000-of-00020.bin` ... in order."""
    single = idx_path.with_suffix(".bin")
    if single.is_file():
        return [single]
    stem = re.escape(idx_path.stem)
    pattern = re.compile(rf"^{stem}-(\d+)-of-(\d+)\.bin$")
    parts = sorted(
        (int(m.group(1)), int(m.group(2)), p) for p in idx_path.parent.iterdir() if (m := pattern.match(p.name))
    )
    if not parts:
        raise UserError(
            f"{single} is missing (nor are there parts "
            f"{idx_path.stem}-NNNNN-of-NNNNN.bin): download the .bin next to the .idx"
        )
    total = parts[0][1]
    if [n for n, _, _ in parts] != list(range(total)) or any(t != total for _, t, _ in parts):
        raise UserError(
            f"{idx_path.parent}: the parts of {idx_path.stem}.bin are "
            f"incomplete ({len(parts)} of {total}): download them all"
        )
    return [p for _, _, p in parts]


def _check_sizes(index: MegatronIndex, bins: list[Path]) -> None:
    itemsize = index.dtype.itemsize
    total = sum(p.stat().st_size for p in bins)
    for p in bins:
        if p.stat().st_size % itemsize:
            raise UserError(f"{p} is corrupt: {p.stat().st_size} bytes is not a multiple of {itemsize} ({index.dtype})")
    if len(index.pointers) and int(index.pointers[0]) != 0:
        raise UserError(
            f"{index.path}: the first sequence starts at byte "
            f"{int(index.pointers[0])}, not 0: not a packed Megatron dataset"
        )
    if total != index.num_tokens * itemsize:
        raise UserError(
            f"{index.path} describes {index.num_tokens} tokens ({index.num_tokens * itemsize} bytes) but "
            f"{', '.join(p.name for p in bins)} hold {total} bytes: the .bin is truncated or belongs to another index"
        )


def _check_sample(index: MegatronIndex, stream: TokenStream, tokenizer: Tokenizer) -> None:
    """First and last sequences: each must end with EOS, and ids must fit the tokenizer."""
    count = len(index.sizes)
    picks = sorted(set(range(min(_SAMPLE, count))) | set(range(max(count - _SAMPLE, 0), count)))
    if not picks:
        return
    starts = index.pointers[picks] // index.dtype.itemsize
    ends = starts + index.sizes[picks]
    nonempty = ends > starts
    last_tokens = np.array([stream.read(int(e) - 1, int(e))[0] for e in ends[nonempty]])
    if len(last_tokens) and not np.all(last_tokens == tokenizer.eos_id):
        bad = int(np.count_nonzero(last_tokens != tokenizer.eos_id))
        raise UserError(
            f"{index.path}: {bad} of {len(last_tokens)} sampled documents do not end with EOS id "
            f"{tokenizer.eos_id} of tokenizer {tokenizer.name}: the data must be made with "
            "--append-eod and read with the tokenizer that made it (--data.tokenizer neox for Pythia)"
        )
    head = stream.read(int(starts[0]), int(ends[min(len(ends), _SAMPLE) - 1]))
    if head.size and int(head.max()) >= tokenizer.vocab_size:
        raise UserError(
            f"{index.path} holds token id {int(head.max())} but tokenizer {tokenizer.name} has "
            f"{tokenizer.vocab_size} ids: use the tokenizer the data was made with (--data.tokenizer neox for Pythia)"
        )
