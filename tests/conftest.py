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
