"""Tokenizer loading: the vendored Pythia tokenizer, the corpus-trained bpe4k, bytes, local
files/directories, hub names offline."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import socket
from pathlib import Path

import pytest

from ponder_lightning.data import PileDataModule, iter_documents, load_tokenizer
from ponder_lightning.data import tokenizer as tokenizer_module
from ponder_lightning.data.packing import num_val_docs
from ponder_lightning.data.prepare import prepare_tokens
from ponder_lightning.data.shards import load_token_shards
from ponder_lightning.data.sources import embedded_corpus
from ponder_lightning.data.tokenizer import VENDORED_BPE4K, VENDORED_NEOX
from ponder_lightning.errors import UserError

NEOX_FILE = str(VENDORED_NEOX)
BPE4K_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_bpe_tokenizer.py"

# Ids checked against the unmodified OLMo copy of the GPT-NeoX-20B tokenizer (which only adds PII tokens).
PYTHIA_IDS = {
    "Hello world": [12092, 1533],
    "  leading spaces and    inner   runs": [50276, 16378, 8470, 285, 50274, 5338, 50275, 83, 4539],
    "line one\nline two\n\n\tindented": [1282, 581, 187, 1282, 767, 535, 186, 527, 8006],
    "naïve café — 東京 🚀": [2072, 30180, 36241, 1905, 209, 12676, 111, 5494, 107, 22692, 237, 211],
}


@pytest.fixture(scope="module")
def neox():
    return load_tokenizer("neox")


@pytest.mark.parametrize("text", list(PYTHIA_IDS))
def test_neox_matches_pythia_ids_and_round_trips(neox, text):
    assert neox.encode(text) == PYTHIA_IDS[text]
    assert neox.decode(neox.encode(text)) == text


def test_neox_vocabulary_and_identity(neox):
    assert neox.vocab_size == 50277
    assert neox.eos_id == 0
    assert neox.name.startswith("neox:") and len(neox.name) == len("neox:") + 40
    assert load_tokenizer("pythia").name == load_tokenizer("gpt-neox-20b").name == neox.name
    assert neox.encode_batch(list(PYTHIA_IDS)) == list(PYTHIA_IDS.values())


def test_literal_eos_text_is_not_the_eos_id(neox):
    ids = neox.encode("end<|endoftext|>start")
    assert neox.eos_id not in ids
    assert neox.decode(ids) == "end<|endoftext|>start"
    assert neox.decode([12092, neox.eos_id]) == "Hello<|endoftext|>"


def test_bytes_round_trip():
    tok = load_tokenizer("bytes")
    assert (tok.name, tok.vocab_size, tok.eos_id) == ("bytes", 257, 256)
    text = "plain ascii, ünïcödé and 🚀\n"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("a") + [256] + tok.encode("b")) == "a<|endoftext|>b"


def test_local_tokenizer_file_and_hf_directory(tmp_path, neox):
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_file=NEOX_FILE, eos_token="<|endoftext|>").save_pretrained(tmp_path / "hf")
    for spec in (str(tmp_path / "hf"), NEOX_FILE):
        tok = load_tokenizer(spec)
        assert (tok.vocab_size, tok.eos_id) == (50277, 0)
        assert tok.encode_batch(list(PYTHIA_IDS)) == list(PYTHIA_IDS.values())
        assert tok.name.startswith("hf:")


def test_exported_tokenizers_give_the_librarys_ids(tmp_path):
    """`write_tokenizer`'s files (what an export holds) encode text as `load_tokenizer(spec)`
    does, a literal end-of-text marker included (text, not the EOS id)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from ponder_lightning.io.export import write_tokenizer

    PreTrainedTokenizerFast(tokenizer_file=NEOX_FILE, eos_token="<|endoftext|>").save_pretrained(tmp_path / "hf")
    texts = ["a<|endoftext|>b", "Hello  wörld\n\t😀 日本", " x", ""]
    for i, spec in enumerate(["bytes", "bpe4k", "neox", NEOX_FILE, str(tmp_path / "hf")]):
        (out := tmp_path / f"out{i}").mkdir()
        write_tokenizer(spec, out, 64)
        exported, ours = AutoTokenizer.from_pretrained(out), load_tokenizer(spec)
        assert [exported(t)["input_ids"] for t in texts] == ours.encode_batch(texts), spec
        assert exported.eos_token_id == ours.eos_id, spec


def test_tokenizer_file_without_eos_is_rejected(tmp_path):
    path = tmp_path / "tiny.json"
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path))
    with pytest.raises(UserError, match="tiny.json"):
        load_tokenizer(str(path))


def test_unreadable_tokenizer_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(UserError, match="broken.json"):
        load_tokenizer(str(path))


def test_hub_name_offline_fails_fast_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(UserError, match="EleutherAI/pythia-70m") as err:  # no connection attempted
        load_tokenizer("EleutherAI/pythia-70m")
    assert "HF_HUB_OFFLINE" in str(err.value) and "\n" not in str(err.value)


# -- bpe4k: the byte-level BPE trained on the embedded corpus (scripts/build_bpe_tokenizer.py) --------

UNICODE_TEXTS = [
    "naïve café — 東京 🚀",
    "e\u0301 vs \u00e9, ﬁ ligature, Ωmega, 👩‍👩‍👧 family, Ελληνικά, русский, العربية",  # not NFC: kept as is
    "\x00\x01 control bytes\r\n\ttab, trailing spaces   \n\n",
]


@pytest.fixture(scope="module")
def bpe4k():
    return load_tokenizer("bpe4k")


@pytest.fixture(scope="module")
def corpus_split():
    """(train, val) documents of the embedded corpus, split as PileDataModule splits them by default."""
    docs = list(iter_documents(embedded_corpus()))
    val_fraction = inspect.signature(PileDataModule).parameters["val_fraction"].default
    n_val = num_val_docs(len(docs), val_fraction)
    return docs[: len(docs) - n_val], docs[len(docs) - n_val :]


def _build_script():
    spec = importlib.util.spec_from_file_location("build_bpe_tokenizer", BPE4K_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bpe4k_loads_offline_with_neox_conventions(bpe4k, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    tok = tokenizer_module._vendored.__wrapped__(VENDORED_BPE4K, "bpe4k")  # uncached: really reads the asset
    digest = hashlib.sha1(VENDORED_BPE4K.read_bytes()).hexdigest()
    assert (tok.name, tok.vocab_size, tok.eos_id) == (bpe4k.name, 4096, 0) == ("bpe4k:" + digest, 4096, 0)
    assert tok.backend.get_vocab_size(with_added_tokens=True) == 4096
    assert tok.backend.token_to_id("<|endoftext|>") == 0 and tok.backend.token_to_id("<|padding|>") == 1
    assert load_tokenizer("BPE4K").name == bpe4k.name != load_tokenizer("neox").name
    ids = bpe4k.encode("end<|endoftext|>start")  # document text never produces the EOS id
    assert bpe4k.eos_id not in ids and bpe4k.decode(ids) == "end<|endoftext|>start"
    assert bpe4k.decode(bpe4k.encode("Hello") + [bpe4k.eos_id]) == "Hello<|endoftext|>"


def test_bpe4k_round_trips_corpus_and_unicode_text(bpe4k, corpus_split):
    train, val = corpus_split
    texts = train[:5] + val + UNICODE_TEXTS + list(PYTHIA_IDS)
    encoded = bpe4k.encode_batch(texts)
    assert encoded == [bpe4k.encode(t) for t in texts]
    for text, ids in zip(texts, encoded, strict=True):
        assert bpe4k.decode(ids) == text
        assert min(ids) > 1 and max(ids) < bpe4k.vocab_size  # no EOS or padding ids from text
    assert len(bpe4k.encode("Return the number of items in the container.")) <= 10  # whole words


def test_bpe4k_chars_per_token_on_validation_text(bpe4k, corpus_split):
    """Measured: bpe4k 3.70 characters per token on the held-out 21 documents (79,060 characters),
    neox 4.05, bytes 1.00."""
    _, val = corpus_split
    chars = sum(map(len, val))
    per_token = {
        name: chars / sum(map(len, tok.encode_batch(val)))
        for name, tok in (("bpe4k", bpe4k), ("bytes", load_tokenizer("bytes")))
    }
    assert 3.5 < per_token["bpe4k"] < 4.5
    assert 0.99 < per_token["bytes"] <= 1.0


def test_bpe4k_asset_loads_in_transformers(bpe4k):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(VENDORED_BPE4K), eos_token="<|endoftext|>", pad_token="<|padding|>")
    text = "def f(x):\n    return x  # " + UNICODE_TEXTS[0]
    assert (len(hf), hf.eos_token_id, hf.pad_token_id) == (4096, 0, 1)
    assert hf.encode(text, add_special_tokens=False) == bpe4k.encode(text)
    assert hf.decode(bpe4k.encode(text)) == text
    as_file = load_tokenizer(str(VENDORED_BPE4K))  # the file path works like any tokenizer.json
    assert (as_file.vocab_size, as_file.eos_id, as_file.encode(text)) == (4096, 0, bpe4k.encode(text))


def test_build_script_reproduces_committed_asset(corpus_split):
    script = _build_script()
    train, _ = corpus_split
    assert script.VAL_FRACTION == inspect.signature(PileDataModule).parameters["val_fraction"].default
    docs = script.training_documents()
    assert docs == train  # validation documents never shape the vocabulary
    built = script.build(docs)
    script.verify(built)
    assert script.serialize(built) == VENDORED_BPE4K.read_text(encoding="utf-8"), (
        "scripts/build_bpe_tokenizer.py no longer reproduces the committed asset (a different tokenizers "
        "version?): rebuild it with the script and commit it"
    )


def test_datamodule_with_bpe4k_yields_blocks_within_vocab(tmp_path, bpe4k, corpus_split):
    dm = PileDataModule(tokenizer="bpe4k", seq_len=64, batch_size=4, val_batches=2, cache_dir=str(tmp_path / "cache"))
    dm.setup()
    assert (dm.vocab_size, dm.eos_id) == (4096, 0)
    train, val = dm.train_dataset.stream, dm.val_dataset.stream
    train_ids, val_ids = train.read(0, len(train)), val.read(0, len(val))
    assert train_ids.max() < 4096 and val_ids.max() < 4096
    assert (val_ids == 0).sum() == len(corpus_split[1]) and val_ids[-1] == 0  # one EOS per document
    assert bpe4k.decode(val_ids[:-1].tolist()) == "<|endoftext|>".join(corpus_split[1])
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 65) and int(batch.max()) < 4096
    (entry,) = (tmp_path / "cache" / "tokens").iterdir()  # the cache entry is keyed and labelled by bpe4k
    assert json.loads((entry / "meta.json").read_text())["tokenizer"] == bpe4k.name
    with pytest.raises(UserError, match="bpe4k:.*configured tokenizer is 'neox:"):
        load_token_shards(entry, load_tokenizer("neox"))


def test_prepare_with_bpe4k_and_tokenizer_check(tmp_path, bpe4k, corpus_split):
    data = tmp_path / "docs.jsonl"
    docs = corpus_split[0][:3]
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = prepare_tokens(str(data), tmp_path / "tokens", tokenizer="bpe4k", workers=1, progress=False)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eos_id"], meta["num_docs"]) == (bpe4k.name, 4096, 0, 3)
    stream, num_docs = load_token_shards(tmp_path / "tokens", bpe4k)
    assert stream.read(0, len(stream)).tolist() == [i for d in docs for i in bpe4k.encode(d) + [0]]
    for other in ("neox", "bytes"):
        with pytest.raises(UserError, match="made with tokenizer 'bpe4k:"):
            PileDataModule(tokens=str(tmp_path / "tokens"), tokenizer=other, seq_len=16, batch_size=2).setup()
