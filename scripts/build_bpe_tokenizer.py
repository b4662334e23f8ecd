"""Build ``ponder_lightning/assets/tokenizer/cpython-docs-bpe4k.json``, the ``bpe4k`` tokenizer.

A byte-level BPE with 4096 ids in all, trained with the ``tokenizers`` library on the training
documents of the embedded CPython-docs corpus (``assets/corpus/``). It exists for CPU-sized
studies: Pythia's 50277-token vocabulary makes the LM head and PonderLM's embedding mixture cost
more than a tiny backbone, and bytes (257 ids) give the mixture little to feed back and ~3.7x
longer sequences. 4096 = 2 special tokens + 256 byte symbols + 3838 merges, a multiple of 128 so
the model needs no padding rows.

Same layout as GPT-NeoX-20B (Pythia): ``<|endoftext|>`` is id 0 (EOS, appended after every
document), ``<|padding|>`` id 1, GPT-2's pre-tokenising regex with byte-level symbols and no
added prefix space. Unlike NeoX there is no NFC normaliser, so every string round-trips exactly.
Merged tokens are at most 16 byte symbols long, which drops a few long table borders the
corpus repeats and costs nothing measurable in compression.

Only the training split is used: the DataModule holds out the *last* ``val_fraction`` (default
0.05) of the corpus's documents for validation (``packing.num_val_docs``), and those documents
never shape the vocabulary, so validation perplexity is measured on text the tokenizer has not
seen. Training is deterministic (same bytes on every run and thread count) and takes < 1 s;
``tests/test_tokenizer.py`` checks that this script reproduces the committed file exactly with the
installed ``tokenizers`` (built with 0.23.3; another version may order ties differently, in which
case re-run this script and commit the result).

The output is a Hugging Face ``tokenizer.json``: ``tokenizers.Tokenizer.from_file`` and
``transformers.PreTrainedTokenizerFast(tokenizer_file=..., eos_token="<|endoftext|>")`` both load it.

Usage: python scripts/build_bpe_tokenizer.py [--out PATH] [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ponder_lightning.data.packing import num_val_docs
from ponder_lightning.data.sources import embedded_corpus, iter_documents

VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<|endoftext|>", "<|padding|>"]  # ids 0 and 1, as in GPT-NeoX-20B
MAX_TOKEN_LENGTH = 16
MIN_FREQUENCY = 2
VAL_FRACTION = 0.05  # PileDataModule's default val_fraction
OUT = Path(__file__).resolve().parents[1] / "ponder_lightning/assets/tokenizer/cpython-docs-bpe4k.json"


def training_documents(val_fraction: float = VAL_FRACTION) -> list[str]:
    """The embedded corpus's documents minus the validation tail the DataModule holds out."""
    docs = list(iter_documents(embedded_corpus()))
    return docs[: len(docs) - num_val_docs(len(docs), val_fraction)]


def build(documents: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train the byte-level BPE on ``documents`` (in order; the result does not depend on threads)."""
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(**byte_level)
    tok.decoder = decoders.ByteLevel(**byte_level)
    tok.post_processor = processors.ByteLevel(**byte_level)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=MIN_FREQUENCY,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=MAX_TOKEN_LENGTH,
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer, length=len(documents))
    return tok


def serialize(tok: Tokenizer) -> str:
    """The minified tokenizer.json text written to the asset."""
    return tok.to_str(pretty=False)


def verify(tok: Tokenizer, vocab_size: int = VOCAB_SIZE) -> None:
    """Check what the package relies on: the id count, EOS/padding ids, exact round trips."""
    sample = "def f(x):\n    return x  # naïve café — 東京 🚀\n"
    checks = {
        "vocab size": (tok.get_vocab_size(with_added_tokens=True), vocab_size),
        "max id": (max(tok.get_vocab(with_added_tokens=True).values()), vocab_size - 1),
        "eos id": (tok.token_to_id(SPECIAL_TOKENS[0]), 0),
        "padding id": (tok.token_to_id(SPECIAL_TOKENS[1]), 1),
        "round trip": (tok.decode(tok.encode(sample, add_special_tokens=False).ids), sample),
    }
    for what, (got, want) in checks.items():
        if got != want:
            raise SystemExit(f"bpe tokenizer: {what} is {got!r}, expected {want!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT, help=f"output file (default: {OUT})")
    parser.add_argument(
        "--check", action="store_true", help="only check that --out equals a fresh build (exit 1 if not)"
    )
    args = parser.parse_args()
    docs = training_documents()
    tok = build(docs)
    verify(tok)
    text = serialize(tok)
    if args.check:
        same = args.out.is_file() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out} {'matches' if same else 'DIFFERS FROM'} a fresh build from {len(docs)} documents")
        sys.exit(0 if same else 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {VOCAB_SIZE} ids, trained on {len(docs)} documents)")


if __name__ == "__main__":
    main()
