"""`prepare` (parallel, resumable tokenisation into token shards) and the Megatron .bin/.idx reader:
both give exactly the token stream (and batches) of on-the-fly tokenisation; bad input is one
clear error. Tokenizer mismatches and corrupt shards of our own format are in test_data.py."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

import ponder_lightning.data.prepare as prepare
from ponder_lightning.cli import main
from ponder_lightning.data import PileDataModule, load_tokenizer, resolve_sources
from ponder_lightning.data.megatron import MAGIC, load_megatron
from ponder_lightning.data.shards import load_token_shards
from ponder_lightning.data.tokenized import cached_token_stream
from ponder_lightning.errors import UserError

DOCS = [
    f"Document {i}: naïve café, {'ünïcödé ' * (i % 4)}the quick brown fox {i * 7}. " * (1 + i % 3) for i in range(60)
]


def write_files(tmp_path: Path) -> list[Path]:
    """Three Pile-format files (two compressed) holding DOCS in order."""
    files = []
    for name, docs in (("a.jsonl.zst", DOCS[:25]), ("b.jsonl", DOCS[25:40]), ("c.jsonl.zst", DOCS[40:])):
        data = "".join(json.dumps({"text": d, "meta": {"pile_set_name": "test"}}) + "\n" for d in docs).encode()
        path = tmp_path / "pile" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(zstandard.ZstdCompressor().compress(data) if name.endswith(".zst") else data)
        files.append(path)
    return files


def on_the_fly(tmp_path: Path, files: list[Path], tokenizer: str) -> tuple[np.ndarray, int]:
    stream, docs = cached_token_stream(
        resolve_sources([str(f) for f in files]), load_tokenizer(tokenizer), "text", tmp_path / "cache"
    )
    return stream.read(0, len(stream)), docs


def prepared(out: Path, tokenizer: str) -> tuple[np.ndarray, int]:
    stream, docs = load_token_shards(out, load_tokenizer(tokenizer))
    return stream.read(0, len(stream)), docs


def batches(dm: PileDataModule) -> list[torch.Tensor]:
    return [*dm.train_dataloader(), *dm.val_dataloader()]


def test_prepare_command_in_parallel_round_trips_to_on_the_fly_tokens(tmp_path, capsys):
    files = write_files(tmp_path)
    out = tmp_path / "tokens"
    main(["prepare", "--data_files", str(tmp_path / "pile" / "*.jsonl*"), "--out", str(out), "--workers", "2"])
    assert f"--data.tokens {out}" in capsys.readouterr().out
    ids, docs = prepared(out, "neox")
    expected_ids, expected_docs = on_the_fly(tmp_path, files, "neox")
    assert docs == expected_docs == len(DOCS) and ids.dtype == np.uint16
    np.testing.assert_array_equal(ids, expected_ids)
    # The DataModule reads it as `--data.tokens` and sees the same batches as from the text files.
    kwargs = {"tokenizer": "neox", "seq_len": 16, "batch_size": 4, "cache_dir": str(tmp_path / "cache")}
    a = batches(PileDataModule(tokens=str(out), **kwargs))
    b = batches(PileDataModule(data_files=str(tmp_path / "pile" / "*.jsonl*"), **kwargs))
    assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_interrupted_prepare_resumes_and_redoes_only_changed_files(tmp_path, monkeypatch):
    files = write_files(tmp_path)
    out = tmp_path / "tokens"
    encoded = []
    real_encode, real_commit = prepare.encode_documents, prepare._commit

    def counting_encode(texts, tok):
        for ids in real_encode(texts, tok):
            encoded.append(1)
            yield ids

    commits = []

    def interrupting_commit(*args):
        commits.append(1)
        if len(commits) == 3:  # tokens written since the 2nd commit are on disk but not recorded
            raise KeyboardInterrupt
        real_commit(*args)

    monkeypatch.setattr(prepare, "encode_documents", counting_encode)
    monkeypatch.setattr(prepare, "_commit", interrupting_commit)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_tokens([str(f) for f in files], out, "bytes", workers=1, progress=False, commit_tokens=300)
    assert not (out / "meta.json").exists()
    first_run = len(encoded)

    monkeypatch.setattr(prepare, "_commit", real_commit)
    encoded.clear()
    prepare.prepare_tokens([str(f) for f in files], out, "bytes", workers=1, progress=False, commit_tokens=300)
    assert len(encoded) < len(DOCS) and first_run + len(encoded) > len(DOCS)  # skipped committed documents
    expected = on_the_fly(tmp_path, files, "bytes")
    ids, docs = prepared(out, "bytes")
    np.testing.assert_array_equal(ids, expected[0])
    assert docs == expected[1]

    encoded.clear()
    prepare.prepare_tokens([str(f) for f in files], out, "bytes", workers=1, progress=False)
    assert encoded == []  # everything done: nothing re-tokenised
    files[1].write_text(json.dumps({"text": "a changed file"}) + "\n")
    prepare.prepare_tokens([str(f) for f in files], out, "bytes", workers=1, progress=False)
    assert len(encoded) == 1
    np.testing.assert_array_equal(prepared(out, "bytes")[0], on_the_fly(tmp_path, files, "bytes")[0])


def test_prepare_refuses_to_mix_tokenizers_in_one_directory(tmp_path):
    files = [str(f) for f in write_files(tmp_path)]
    prepare.prepare_tokens(files, tmp_path / "tokens", "bytes", workers=1, progress=False)
    with pytest.raises(UserError, match="different settings"):
        prepare.prepare_tokens(files, tmp_path / "tokens", "neox", workers=1, progress=False)


# --- Megatron MMapIndexedDataset (Pythia's pre-tokenised Pile) ---------------------------------


def write_megatron(prefix: Path, docs: list[list[int]], dtype=np.uint16, code: int = 8, split_bin: int = 0) -> None:
    """Megatron's MMapIndexedDataset layout, written with numpy: magic, version, dtype code,
    sizes (int32), pointers (int64 byte offsets), doc_idx (int64)."""
    sizes = np.array([len(d) for d in docs], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64) * np.dtype(dtype).itemsize]).astype(np.int64)
    doc_idx = np.arange(len(docs) + 1, dtype=np.int64)
    with open(prefix.with_suffix(".idx"), "wb") as fh:
        fh.write(MAGIC + struct.pack("<Q", 1) + struct.pack("<B", code))
        fh.write(struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx)))
        fh.write(sizes.tobytes() + pointers.tobytes() + doc_idx.tobytes())
    data = np.concatenate([np.asarray(d, dtype=dtype) for d in docs]).tobytes()
    if not split_bin:
        prefix.with_suffix(".bin").write_bytes(data)
        return
    cut = (len(data) // 2) // np.dtype(dtype).itemsize * np.dtype(dtype).itemsize
    for i, part in enumerate((data[:cut], data[cut:])):
        (prefix.parent / f"{prefix.name}-{i:05d}-of-00002.bin").write_bytes(part)


def byte_docs(texts: list[str]) -> list[list[int]]:
    tok = load_tokenizer("bytes")
    return [tok.encode(t) + [tok.eos_id] for t in texts]


@pytest.mark.parametrize("split_bin", [0, 2])
def test_megatron_bin_idx_reads_as_the_same_batches(tmp_path, split_bin):
    files = write_files(tmp_path)
    write_megatron(tmp_path / "pile_text_document", byte_docs(DOCS), split_bin=split_bin)
    stream, num_docs = load_megatron(tmp_path / "pile_text_document", load_tokenizer("bytes"))
    expected, expected_docs = on_the_fly(tmp_path, files, "bytes")
    np.testing.assert_array_equal(stream.read(0, len(stream)), expected)
    assert num_docs == expected_docs == len(DOCS)
    kwargs = {"tokenizer": "bytes", "seq_len": 16, "batch_size": 4, "cache_dir": str(tmp_path / "cache")}
    reference = batches(PileDataModule(data_files=[str(f) for f in files], **kwargs))
    for spec in ("pile_text_document", "pile_text_document.idx", "."):  # prefix, file, directory
        got = batches(PileDataModule(tokens=str(tmp_path / spec), **kwargs))
        assert len(got) == len(reference) > 0 and all(torch.equal(x, y) for x, y in zip(got, reference, strict=True))


def test_megatron_bad_input_is_one_clear_error(tmp_path):
    tok = load_tokenizer("bytes")
    prefix = tmp_path / "doc"
    write_megatron(prefix, byte_docs(DOCS))
    with prefix.with_suffix(".bin").open("r+b") as fh:
        fh.truncate(100)
    with pytest.raises(UserError, match="truncated or belongs to another index"):
        load_megatron(prefix, tok)
    write_megatron(prefix, [d[:-1] for d in byte_docs(DOCS)])  # no EOS after documents
    with pytest.raises(UserError, match="do not end with EOS id 256.*--append-eod"):
        load_megatron(prefix, tok)
    write_megatron(prefix, [[300, *d] for d in byte_docs(DOCS)])  # ids beyond the tokenizer
    with pytest.raises(UserError, match="token id 300 but tokenizer bytes has 257 ids"):
        load_megatron(prefix, tok)
    write_megatron(prefix, byte_docs(DOCS))
    with prefix.with_suffix(".idx").open("r+b") as fh:
        fh.write(b"NOTMEGA!!")
    with pytest.raises(UserError, match="not a Megatron index"):
        load_megatron(prefix, tok)
    write_megatron(prefix, byte_docs(DOCS), dtype=np.float32, code=7)
    with pytest.raises(UserError, match="dtype code 7"):
        load_megatron(prefix, tok)
