"""Tokenizer loading: the vendored Pythia tokenizer, bytes, local files/directories, hub names offline."""

from __future__ import annotations

import json
import socket
import time

import pytest

from ponder_lightning.data import load_tokenizer
from ponder_lightning.data.tokenizer import VENDORED_NEOX
from ponder_lightning.errors import UserError

NEOX_FILE = str(VENDORED_NEOX)

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
    start = time.perf_counter()
    with pytest.raises(UserError, match="EleutherAI/pythia-70m") as err:
        load_tokenizer("EleutherAI/pythia-70m")
    assert time.perf_counter() - start < 1.0
    assert "HF_HUB_OFFLINE" in str(err.value) and "\n" not in str(err.value)
