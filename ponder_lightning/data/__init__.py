"""Data layer: tokenizers, Pile-format sources, token caches/shards and the Lightning DataModule.

Pre-tokenising (what a ``prepare`` command does) composes the pieces::

    tok = load_tokenizer("neox")
    texts = iter_documents(resolve_sources(["pile/*.jsonl.zst"]), "text")
    write_token_shards("tokens/pile", encode_documents(texts, tok), tok)
"""

from ponder_lightning.data.datamodule import PileDataModule
from ponder_lightning.data.shards import load_token_shards, write_token_shards
from ponder_lightning.data.sources import iter_documents, resolve_sources
from ponder_lightning.data.tokenized import encode_documents
from ponder_lightning.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "PileDataModule",
    "Tokenizer",
    "encode_documents",
    "iter_documents",
    "load_token_shards",
    "load_tokenizer",
    "resolve_sources",
    "write_token_shards",
]
