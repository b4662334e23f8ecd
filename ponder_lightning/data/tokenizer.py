"""Tokenizers behind one small interface, so the data pipeline and generation never care which.

``load_tokenizer("neox")`` gives the real Pythia (GPT-NeoX-20B) tokenizer from a file vendored in
the package, so the default path works offline. ``"bpe4k"`` is a small byte-level BPE shipped the
same way (4096 ids, EOS 0, NeoX's layout) and trained on the embedded corpus's training documents,
for CPU-sized studies: subword tokens with an LM head that stays cheap
(``scripts/build_bpe_tokenizer.py`` rebuilds it exactly). ``"bytes"`` is a dependency-free UTF-8
byte tokenizer for tests and toy runs. Anything else is a local ``tokenizer.json`` / Hugging Face
tokenizer directory, or (online only) a hub name.

Every tokenizer encodes text *as text*: a literal ``<|endoftext|>`` inside a document is not turned
into the EOS id, so the data pipeline can rely on "one EOS per document".
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import tokenizers

from ponder_lightning.errors import UserError, first_line

NEOX_ALIASES = ("neox", "gpt-neox-20b", "pythia")
BPE4K_ALIASES = ("bpe4k",)
VENDORED_NEOX = Path(__file__).resolve().parents[1] / "assets" / "tokenizer" / "gpt-neox-20b.json"
VENDORED_BPE4K = VENDORED_NEOX.with_name("cpython-docs-bpe4k.json")
# Special tokens recognised as end-of-document in a bare tokenizer.json (which has no eos field).
KNOWN_EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")
EOS_TEXT = "<|endoftext|>"


class Tokenizer:
    """The interface the rest of the package uses.

    ``name`` is a stable identity (it keys token caches and is checked against pre-tokenised
    data), ``vocab_size`` the number of ids the tokenizer can emit (special tokens included) and
    ``eos_id`` the id appended after every document.
    """

    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 plus EOS 256: no files, no training, exact round trips."""

    name = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out, chunk = [], bytearray()
        for i in ids:
            if i == self.eos_id:
                out.append(chunk.decode("utf-8", errors="replace") + EOS_TEXT)
                chunk = bytearray()
            else:
                chunk.append(i)
        return "".join(out) + chunk.decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Rust ``tokenizers`` backend; batch encoding runs in parallel inside the library."""

    def __init__(self, backend: tokenizers.Tokenizer, eos_id: int, name: str) -> None:
        backend.encode_special_tokens = True  # document text never produces EOS/padding ids
        self.backend = backend
        self.eos_id = eos_id
        self.name = name
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(spec: str = "neox") -> Tokenizer:
    """Resolve ``spec``: an existing local path first, then ``neox``/``bpe4k``/``bytes``, then a hub name."""
    path = Path(spec).expanduser()
    if path.exists():
        return _from_path(path)
    if spec.lower() in NEOX_ALIASES:
        return _vendored(VENDORED_NEOX, "neox")
    if spec.lower() in BPE4K_ALIASES:
        return _vendored(VENDORED_BPE4K, "bpe4k")
    if spec.lower() == "bytes":
        return ByteTokenizer()
    if looks_like_path(spec):
        raise UserError(
            f"tokenizer path {spec} does not exist: pass an existing tokenizer.json or Hugging Face tokenizer "
            "directory, 'neox', 'bpe4k' or 'bytes'"
        )
    return _from_hub(spec)


def looks_like_path(spec: str) -> bool:
    """A local path rather than a hub name ('org/name'): absolute, relative to ./ ../ ~, a file
    name, or more than one '/'."""
    return spec.startswith(("/", "./", "../", "~", ".\\")) or spec.endswith(".json") or spec.count("/") > 1


@functools.cache
def _vendored(path: Path, prefix: str) -> Tokenizer:
    """A tokenizer shipped in assets/tokenizer/ (EOS ``<|endoftext|>``), named ``prefix:<sha1 of
    the file>`` so a changed asset invalidates token caches and fails the shard checks."""
    data = path.read_bytes()
    backend = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    return HFTokenizer(backend, backend.token_to_id(EOS_TEXT), f"{prefix}:" + hashlib.sha1(data).hexdigest())


def _from_path(path: Path) -> Tokenizer:
    if path.is_dir():
        return _from_transformers(str(path), f"tokenizer directory {path}")
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the Rust library raises bare Exceptions
        raise UserError(
            f"tokenizer file {path} could not be read ({first_line(exc)}): pass a tokenizer.json, "
            "a Hugging Face tokenizer directory, 'neox', 'bpe4k' or 'bytes'"
        ) from exc
    eos = next((backend.token_to_id(t) for t in KNOWN_EOS_TOKENS if backend.token_to_id(t) is not None), None)
    if eos is None:
        raise UserError(
            f"tokenizer file {path} has none of the end-of-text tokens {', '.join(KNOWN_EOS_TOKENS)}: "
            "pass its Hugging Face directory (with tokenizer_config.json naming eos_token) instead"
        )
    return HFTokenizer(backend, eos, _hf_name(backend))


def _from_hub(name: str) -> Tokenizer:
    if offline_variable("HF_HUB_OFFLINE"):
        raise UserError(
            f"tokenizer '{name}' is not a local path and HF_HUB_OFFLINE=1: download it to a local "
            "directory and pass that path, or use 'neox' / 'bpe4k' / 'bytes'"
        )
    try:  # a download made earlier loads without the network
        return _from_transformers(name, f"hub tokenizer '{name}'", local_files_only=True)
    except UserError:
        pass
    if not hub_reachable():  # else transformers retries for about a minute before failing
        raise UserError(
            f"tokenizer '{name}' is not a local path, not in the local Hugging Face cache, and the hub cannot be "
            "reached: download it to a local directory and pass that path, or use 'neox' / 'bpe4k' / 'bytes' "
            "(HF_HUB_OFFLINE=1 says so at once)"
        )
    return _from_transformers(name, f"hub tokenizer '{name}'")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint opens within `timeout` seconds."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def _from_transformers(source: str, what: str, local_files_only: bool = False) -> Tokenizer:
    """Any tokenizer transformers can load, used through its fast (``tokenizers``) backend."""
    from transformers import AutoTokenizer  # heavy import, only needed for these specs

    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    except Exception as exc:  # noqa: BLE001 - transformers raises many unrelated types
        raise UserError(f"{what} could not be loaded ({first_line(exc)}): check the name or path") from exc
    backend = getattr(tok, "backend_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer):
        raise UserError(f"{what} has no fast (tokenizers) backend: convert it to a tokenizer.json first")
    if tok.eos_token_id is None:
        raise UserError(f"{what} defines no eos_token: set eos_token in its tokenizer_config.json")
    return HFTokenizer(backend, int(tok.eos_token_id), _hf_name(backend))


def _hf_name(backend: tokenizers.Tokenizer) -> str:
    return "hf:" + hashlib.sha1(backend.to_str().encode("utf-8")).hexdigest()


def offline_variable(*names: str) -> str | None:
    """The first of the environment variables `names` (HF_HUB_OFFLINE, ...) set to a true value:
    fetching from the hub is then forbidden, and the error should name the variable."""
    return next((v for v in names if os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}), None)


def is_builtin_tokenizer(spec: str) -> bool:
    """Whether `spec` names one of the library's own tokenizers (`neox` and its aliases, `bpe4k`,
    `bytes`) rather than a path or a hub name."""
    return spec.lower() in (*NEOX_ALIASES, *BPE4K_ALIASES, "bytes")
