import os

import pytest
import torch

# Tests never touch the network; hub names must fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed_and_isolate(tmp_path, monkeypatch):
    """Deterministic weights, and a private token cache per test."""
    torch.manual_seed(0)
    monkeypatch.setenv("PONDER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny shapes: one intra-op thread is as fast, and it avoids the thread
    oversubscription that makes a 2-core CI box crawl when other jobs share it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
