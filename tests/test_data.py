"""Data layer: reading, packing, caching, token shards, deterministic sampling and user errors.

Most tests use the ``bytes`` tokenizer and tiny files so token ids are easy to reason about.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import zstandard

import ponder_lightning.data.tokenized as tokenized
from ponder_lightning.data import PileDataModule, encode_documents, load_tokenizer, write_token_shards
from ponder_lightning.data.sampling import TrainBatchSampler, train_batch
from ponder_lightning.errors import UserError

EOS = 256  # the bytes tokenizer's EOS
DOCS = [f"document {i}: " + "lorem ipsum " * (i % 5 + 1) for i in range(40)]


def write_jsonl(path: Path, docs: list[str], compress: bool = False) -> Path:
    data = "".join(json.dumps({"text": d, "meta": {"pile_set_name": "test"}}) + "\n" for d in docs).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if compress else data)
    return path


def make_dm(tmp_path: Path, **kwargs) -> PileDataModule:
    kwargs = {"tokenizer": "bytes", "seq_len": 16, "batch_size": 4, "cache_dir": str(tmp_path / "cache"), **kwargs}
    return PileDataModule(**kwargs)


def stream_ids(dm: PileDataModule, split: str) -> list[int]:
    dataset = dm.train_dataset if split == "train" else dm.val_dataset
    return dataset.stream.read(0, len(dataset.stream)).tolist()


def documents_of(ids: list[int]) -> list[str]:
    """Split an EOS-terminated stream of byte tokens back into document strings."""
    assert ids[-1] == EOS
    docs, current = [], []
    for i in ids:
        if i == EOS:
            docs.append(bytes(current).decode())
            current = []
        else:
            current.append(i)
    return docs


# --- reading and packing -------------------------------------------------------------------------


def test_packing_puts_eos_between_documents_and_blocks_overlap_by_one(tmp_path):
    dm = make_dm(
        tmp_path, data_files=str(write_jsonl(tmp_path / "a.jsonl", ["abc", "de", "fghij"] * 10)), val_fraction=0
    )
    dm.setup()
    stream = stream_ids(dm, "train")
    assert stream[:13] == [*b"abc", EOS, *b"de", EOS, *b"fghij", EOS]
    blocks = [dm.train_dataset[i] for i in range(len(dm.train_dataset))]
    assert len(blocks) == (len(stream) - 1) // 16 and all(b.shape == (17,) and b.dtype == torch.int64 for b in blocks)
    for i, (block, nxt) in enumerate(zip(blocks, blocks[1:], strict=False)):
        assert block.tolist() == stream[i * 16 : i * 16 + 17]
        assert block[-1] == nxt[0]


def test_train_and_val_come_from_disjoint_documents(tmp_path):
    dm = make_dm(tmp_path, data_files=str(write_jsonl(tmp_path / "a.jsonl", DOCS)), val_fraction=0.1)
    dm.setup()
    assert documents_of(stream_ids(dm, "train")) == DOCS[:36]
    assert documents_of(stream_ids(dm, "val")) == DOCS[36:]


def test_validation_split_smaller_than_a_batch_warns(tmp_path):
    dm = make_dm(tmp_path, data_files=str(write_jsonl(tmp_path / "a.jsonl", DOCS)), val_fraction=0.1, seq_len=64)
    with pytest.warns(UserWarning, match=r"fewer than one global batch \(data.batch_size=4\), so nothing is validated"):
        assert len(dm.val_dataloader()) == 0


def test_separate_val_files(tmp_path):
    train, val = write_jsonl(tmp_path / "train.jsonl", DOCS[:30]), write_jsonl(tmp_path / "val.jsonl", DOCS[30:])
    dm = make_dm(tmp_path, data_files=str(train), val_files=str(val))
    dm.setup()
    assert documents_of(stream_ids(dm, "train")) == DOCS[:30]
    assert documents_of(stream_ids(dm, "val")) == DOCS[30:]


def test_val_files_inside_the_training_data_are_refused(tmp_path):
    (tmp_path / "pile" / "sub").mkdir(parents=True)
    write_jsonl(tmp_path / "pile" / "train.jsonl", DOCS[:30])
    val = write_jsonl(tmp_path / "pile" / "sub" / "val.jsonl", DOCS[30:])
    dm = make_dm(
        tmp_path, data_files=str(tmp_path / "pile"), val_files=str(val)
    )  # the directory is searched recursively
    with pytest.raises(UserError, match=re.escape(f"data.val_files {val} is also in data.data_files")):
        dm.setup()
    # The very same files for both (what `evaluate --data_files` passes) are a choice, not a leak.
    make_dm(tmp_path, data_files=str(val), val_files=str(val), batch_size=1).setup()


def test_jsonl_zst_and_txt_are_read_in_order(tmp_path):
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "1.jsonl", DOCS[:10])
    write_jsonl(tmp_path / "d" / "2.jsonl.zst", DOCS[10:20], compress=True)
    for i, doc in enumerate(DOCS[20:25]):
        (tmp_path / "d" / f"3_{i}.txt").write_text(doc)
    dm = make_dm(tmp_path, data_files=[str(tmp_path / "d" / "1.jsonl"), str(tmp_path / "d" / "[23]*")], val_fraction=0)
    dm.setup()
    assert documents_of(stream_ids(dm, "train")) == DOCS[:25]
    directory = make_dm(tmp_path, data_files=str(tmp_path / "d"), val_fraction=0)
    directory.setup()
    assert stream_ids(directory, "train") == stream_ids(dm, "train")


def test_multi_frame_zst(tmp_path):
    path = tmp_path / "multi.jsonl.zst"
    frames = [
        zstandard.ZstdCompressor().compress("".join(json.dumps({"text": d}) + "\n" for d in part).encode())
        for part in (DOCS[:5], DOCS[5:9])
    ]
    path.write_bytes(b"".join(frames))
    dm = make_dm(tmp_path, data_files=str(path), val_fraction=0)
    dm.setup()
    assert documents_of(stream_ids(dm, "train")) == DOCS[:9]


# --- token cache ---------------------------------------------------------------------------------


def test_token_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    calls = []
    real = tokenized.encode_documents
    monkeypatch.setattr(tokenized, "encode_documents", lambda texts, tok: calls.append(tok.name) or real(texts, tok))
    data = write_jsonl(tmp_path / "a.jsonl", DOCS)
    entries = lambda: sorted(p.name for p in (tmp_path / "cache" / "tokens").iterdir())  # noqa: E731

    first = make_dm(tmp_path, data_files=str(data))
    first.prepare_data()
    first.setup()
    assert calls == ["bytes"] and len(entries()) == 1
    meta = tmp_path / "cache" / "tokens" / entries()[0] / "meta.json"
    mtime = meta.stat().st_mtime_ns

    second = make_dm(tmp_path, data_files=str(data), val_fraction=0.2)  # the split is not part of the key
    second.setup()
    assert calls == ["bytes"] and meta.stat().st_mtime_ns == mtime
    assert stream_ids(second, "train") == stream_ids(first, "train")[: len(stream_ids(second, "train"))]

    make_dm(tmp_path, data_files=str(data), tokenizer="neox").setup()
    assert calls[-1].startswith("neox:") and len(entries()) == 2

    write_jsonl(data, DOCS[:30])
    os.utime(data, ns=(mtime + 10**9, mtime + 10**9))
    changed = make_dm(tmp_path, data_files=str(data), val_fraction=0)
    changed.setup()
    assert len(calls) == 3 and documents_of(stream_ids(changed, "train")) == DOCS[:30]


def test_token_shards_round_trip_gives_identical_batches(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", DOCS)
    tok = load_tokenizer("bytes")
    meta = write_token_shards(tmp_path / "tokens", encode_documents(DOCS, tok), tok, shard_tokens=100)
    assert len(meta["shards"]) > 3 and meta["num_docs"] == len(DOCS) and meta["dtype"] == "uint16"
    on_the_fly, from_tokens = (
        make_dm(tmp_path, data_files=str(data)),
        make_dm(tmp_path, tokens=str(tmp_path / "tokens")),
    )
    write_token_shards(tmp_path / "one", encode_documents(DOCS, tok), tok)
    single_file = make_dm(tmp_path, tokens=str(tmp_path / "one" / "shard_00000.bin"))  # documents are counted
    for loader in ("train_dataloader", "val_dataloader"):
        a = list(getattr(on_the_fly, loader)())
        for other in (from_tokens, single_file):
            b = list(getattr(other, loader)())
            assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --- sampling ------------------------------------------------------------------------------------


def test_ranks_are_disjoint_and_together_form_the_global_batch():
    for world in (2, 4):
        for g in range(0, 30, 7):
            parts = [train_batch(7, 50, 8, g, rank, world) for rank in range(world)]
            assert sum(parts, []) == train_batch(7, 50, 8, g)
            assert len(set(sum(parts, []))) == 8


def test_sampler_is_deterministic_and_covers_each_epoch():
    a, b = list(TrainBatchSampler(48, 8, seed=3)), list(TrainBatchSampler(48, 8, seed=3))
    assert a == b and len(a) == 6
    assert sorted(sum(a, [])) == list(range(48))  # one epoch visits every block once
    assert a != list(TrainBatchSampler(48, 8, seed=4))
    assert list(TrainBatchSampler(48, 8, seed=3)) != list(iter(TrainBatchSampler(48, 8, seed=3, start_batch=6)))


def test_resuming_at_batch_n_equals_the_tail_of_an_uninterrupted_run():
    uninterrupted = TrainBatchSampler(50, 8, rank=1, world_size=2, seed=5)  # 50 % 8 != 0: batches straddle epochs
    seen = [batch for _ in range(4) for batch in uninterrupted]  # four passes continue each other
    resumed = TrainBatchSampler(50, 8, rank=1, world_size=2, seed=5, start_batch=9)
    assert list(resumed) == seen[9 : 9 + len(resumed)]


def test_dataloaders_shard_by_rank(tmp_path):
    data = str(write_jsonl(tmp_path / "a.jsonl", DOCS))
    single = make_dm(tmp_path, data_files=data, val_fraction=0.3)
    single_train, single_val = list(single.train_dataloader()), list(single.val_dataloader())
    shards = []
    for rank in range(2):
        dm = make_dm(tmp_path, data_files=data, val_fraction=0.3)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, global_step=0, accumulate_grad_batches=1)
        shards.append((list(dm.train_dataloader()), list(dm.val_dataloader())))
    for i, batch in enumerate(single_train):
        assert torch.equal(torch.cat([shards[0][0][i], shards[1][0][i]]), batch)
    assert len(single_val) > 0
    for i, batch in enumerate(single_val):
        assert torch.equal(torch.cat([shards[0][1][i], shards[1][1][i]]), batch)


class _Recorder(L.LightningModule):
    """A one-parameter model that records every training batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[:, 0].tolist())
        return (self.weight - batch.float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tmp_path: Path, max_steps: int, ckpt_path: str | None = None, callbacks=()) -> _Recorder:
    model = _Recorder()
    trainer = L.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=2,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
    )
    dm = make_dm(tmp_path, data_files=str(tmp_path / "a.jsonl"), val_fraction=0, batch_size=2)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_trainer_resume_sees_the_same_batches_as_an_uninterrupted_run(tmp_path):
    write_jsonl(
        tmp_path / "a.jsonl", DOCS[:12]
    )  # 34 blocks -> 17 micro-batches per epoch: the last accumulation window of each epoch is short
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=7, save_top_k=-1)
    uninterrupted = _fit(tmp_path, max_steps=14, callbacks=[checkpoint])
    resumed = _fit(tmp_path, max_steps=14, ckpt_path=str(next((tmp_path / "ckpt").glob("*step=7*"))))
    assert len(uninterrupted.seen) > 20
    assert resumed.seen == uninterrupted.seen[len(uninterrupted.seen) - len(resumed.seen) :]
    assert len(resumed.seen) < len(uninterrupted.seen)


# --- embedded corpus -----------------------------------------------------------------------------


def test_embedded_corpus_loads_with_neox(tmp_path):
    dm = PileDataModule(cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup()
    assert dm.vocab_size == 50277 and dm.eos_id == 0
    assert len(dm.train_dataset.stream) + len(dm.val_dataset.stream) >= 300_000
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (8, 257) and batch.dtype == torch.int64
    assert len(list(dm.val_dataloader())) == 8
    assert " the " in dm.tokenizer_obj.decode(batch[0].tolist())


# --- user errors ---------------------------------------------------------------------------------


def _setup(tmp_path: Path, **kwargs) -> None:
    make_dm(tmp_path, **kwargs).setup()


def test_missing_files_and_globs(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl matched no files"):
        _setup(tmp_path, data_files=str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match=r"\*\.jsonl\.zst matched no files"):
        _setup(tmp_path, data_files=str(tmp_path / "*.jsonl.zst"))
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(UserError, match="notes.md has an unsupported type"):
        _setup(tmp_path, data_files=str(tmp_path / "notes.md"))


def test_hub_dataset_name_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="monology/pile-uncopyrighted"):
        _setup(tmp_path, data_files="monology/pile-uncopyrighted")


def test_corrupt_and_truncated_zst(tmp_path):
    bad = tmp_path / "bad.jsonl.zst"
    bad.write_bytes(b"this is not zstd at all")
    with pytest.raises(UserError, match="bad.jsonl.zst is not valid zstd"):
        _setup(tmp_path, data_files=str(bad))
    full = zstandard.ZstdCompressor().compress(write_jsonl(tmp_path / "x.jsonl", DOCS).read_bytes())
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(UserError, match="cut.jsonl.zst is truncated"):
        _setup(tmp_path, data_files=str(cut))


def test_invalid_json_line_and_missing_text_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(UserError, match="bad.jsonl:2: invalid JSON"):
        _setup(tmp_path, data_files=str(bad))
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "fine"}\n\n{"content": "no text"}\n')
    with pytest.raises(UserError, match="other.jsonl:3: record has no 'text' field"):
        _setup(tmp_path, data_files=str(other))
    content = tmp_path / "content.jsonl"
    content.write_text('{"content": "a custom text field"}\n')
    _setup(tmp_path, data_files=str(content), text_field="content", seq_len=4, batch_size=1, val_fraction=0)


def test_too_little_data_says_how_much_is_needed(tmp_path):
    with pytest.raises(UserError, match=r"has 6 tokens but seq_len=16 needs at least 17"):
        _setup(tmp_path, data_files=str(write_jsonl(tmp_path / "tiny.jsonl", ["hello"])))
    with pytest.raises(UserError, match=r"has 0 tokens"):
        _setup(tmp_path, data_files=str(write_jsonl(tmp_path / "empty.jsonl", [])))
    with pytest.raises(UserError, match=r"fewer than one global batch \(data.batch_size=4\)"):
        _setup(tmp_path, data_files=str(write_jsonl(tmp_path / "small.jsonl", ["x" * 40])))


def test_token_shard_errors(tmp_path):
    tok = load_tokenizer("bytes")
    out = tmp_path / "tokens"
    write_token_shards(out, encode_documents(DOCS, tok), tok)
    with pytest.raises(UserError, match=r"meta.json: tokens were made with tokenizer 'bytes'.*'neox:"):
        _setup(tmp_path, tokens=str(out), tokenizer="neox")
    with pytest.raises(UserError, match="does not exist"):
        _setup(tmp_path, tokens=str(tmp_path / "missing"))
    with (out / "shard_00000.bin").open("ab") as fh:
        fh.write(b"\x00")
    with pytest.raises(UserError, match="shard_00000.bin is corrupt"):
        _setup(tmp_path, tokens=str(out))
    (out / "meta.json").unlink()
    with pytest.raises(UserError, match="meta.json is missing"):
        _setup(tmp_path, tokens=str(out))


def test_world_size_must_divide_the_global_batch(tmp_path):
    dm = make_dm(tmp_path, data_files=str(write_jsonl(tmp_path / "a.jsonl", DOCS)), batch_size=4)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=3, global_step=0, accumulate_grad_batches=1)
    with pytest.raises(UserError, match="batch_size=4 .* world size 3"):
        dm.train_dataloader()


def test_invalid_arguments(tmp_path):
    with pytest.raises(UserError, match="data_files and data.tokens"):
        make_dm(tmp_path, data_files="a.jsonl", tokens="t")
    with pytest.raises(UserError, match="val_fraction=1.5"):
        make_dm(tmp_path, val_fraction=1.5)
    with pytest.raises(UserError, match="seq_len=0"):
        make_dm(tmp_path, seq_len=0)
