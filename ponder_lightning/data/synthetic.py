"""Synthetic documents whose tokens' difficulty is known by construction: the positive control of
adaptive depth (a gate should give more passes to the tokens that need more sequential steps).

`pointer_chase` (select it with `--data.data_files synthetic:pointer_chase --data.tokenizer
bytes`): each document is a random permutation table over a small alphabet, then queries that
follow the table k = 1..max_hops times::

    a>f b>c c>h d>a e>g f>b g>e h>d |2a=b 1c=h 3e=c ...

One character is one token under the `bytes` tokenizer. Every target token carries a label
(`label_text`), read back from the text itself, never from a model:

- `FORMAT` (deterministic: the table's keys in order, `>`, spaces, `|`, `=`),
- `ALEATORIC` (random, no pass can help: the table's values, each query's hop count and start;
  the table's last values are partly predictable by elimination, which a study should keep in mind),
- `STEPS + k` (the answer: k lookups in the table, done in sequence).

`label_text` labels a target only when everything it depends on is in the same block; a token
whose table entry or query start lies before the block's first token is `UNKNOWN` (blocks are cut
from the packed stream without regard to documents).
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ponder_lightning.errors import UserError

#: Labels of target tokens.
UNKNOWN, FORMAT, ALEATORIC, STEPS = -1, 0, 1, 1  # STEPS + k for an answer needing k lookups (k >= 1)
#: The largest label: an answer of the most hops a query can ask (one digit).
MAX_LABEL = STEPS + 9
PREFIX = "synthetic:"
_QUERY = re.compile(r"(?<![0-9])([1-9])([a-z])=([a-z]) ")


def is_synthetic(data_files: str | list[str] | None) -> bool:
    """Whether a data module's `data_files` name a synthetic task (whose blocks `label_block` labels)."""
    files = [data_files] if isinstance(data_files, str) else list(data_files or [])
    return bool(files) and all(str(f).startswith(PREFIX) for f in files)


def label_name(label: int) -> str:
    """`format`, `aleatoric`, `k=2`, ... for tables and logs."""
    if label == UNKNOWN:
        return "unknown"
    return {FORMAT: "format", ALEATORIC: "aleatoric"}.get(label, f"k={label - STEPS}")


@dataclass(frozen=True)
class PointerChase:
    """The generator (see the module docstring): `symbols` letters, queries of 1..`max_hops` hops,
    `queries` per document, `n_docs` documents from `seed`."""

    symbols: int = 8
    max_hops: int = 4
    queries: int = 16
    n_docs: int = 20000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.symbols <= 26:
            raise UserError(f"pointer_chase symbols={self.symbols}: use 2 to 26 letters")
        if not 1 <= self.max_hops <= MAX_LABEL - STEPS:
            raise UserError(f"pointer_chase max_hops={self.max_hops}: use 1 to 9 (one digit)")
        if self.queries < 1 or self.n_docs < 1:
            raise UserError("pointer_chase queries and n_docs must be at least 1")

    @property
    def name(self) -> str:
        return "synthetic:pointer_chase"

    def fingerprint(self) -> list[Any]:
        """What the token cache is keyed on: every setting of the generator."""
        return ["synthetic", "pointer_chase", self.symbols, self.max_hops, self.queries, self.n_docs, self.seed]

    def documents_text(self) -> Iterator[str]:
        rng = random.Random(self.seed)
        letters = string.ascii_lowercase[: self.symbols]
        for _ in range(self.n_docs):
            values = rng.sample(letters, len(letters))
            table = dict(zip(letters, values, strict=True))
            parts = [" ".join(f"{k}>{v}" for k, v in table.items()), " |"]
            for _ in range(self.queries):
                hops, start = rng.randint(1, self.max_hops), rng.choice(letters)
                parts.append(f"{hops}{start}={follow(table, start, hops)} ")
            yield "".join(parts)

    def documents(self, text_field: str = "text") -> Iterator[str]:  # the `Source` protocol
        return self.documents_text()


def follow(table: dict[str, str], start: str, hops: int) -> str:
    for _ in range(hops):
        start = table[start]
    return start


def label_block(ids: list[int]) -> list[int]:
    """Labels of a block of `bytes`-tokenizer ids (EOS and other non-ASCII ids stand apart)."""
    return label_text("".join(chr(i) if i < 128 else "\x00" for i in ids))


def target_labels(batch: Any) -> list[list[int]]:
    """Labels of the targets of each block of a batch (LongTensor [B, T+1]): a block's first token
    is only an input, so each row's labels are those of its tokens from the second on."""
    return [label_block(row)[1:] for row in batch.tolist()]


def label_text(text: str) -> list[int]:
    """One label per character of `text` (one token each; any part of a pointer_chase stream):
    what predicting that character takes, from the text alone. Labels of a block's targets are
    those of its characters from the second on."""
    labels = [UNKNOWN] * len(text)
    for table_match in re.finditer(r"((?:[a-z]>[a-z] )+)\|", text):
        body, start = table_match.group(1), table_match.start(1)
        pairs = [body[i : i + 3] for i in range(0, len(body), 4)]
        # A table cut by the block's start begins after `a`: its keys are not `a`, `b`, ... in order.
        complete = "".join(p[0] for p in pairs) == string.ascii_lowercase[: len(pairs)]
        for i in range(len(pairs)):
            at = start + 4 * i
            labels[at] = FORMAT if complete else UNKNOWN  # keys come in order
            labels[at + 1] = FORMAT
            labels[at + 2] = ALEATORIC
            labels[at + 3] = FORMAT  # the space (or, after the last pair, the space before `|`)
        labels[table_match.end(1)] = FORMAT  # `|`
        table = {p[0]: p[2] for p in pairs} if complete else None
        end = _next_table(text, table_match.end())
        for query in _QUERY.finditer(text, table_match.end(), end):
            hops, begin, answer = int(query.group(1)), query.group(2), query.group(3)
            at = query.start()
            labels[at] = ALEATORIC  # hop count
            labels[at + 1] = ALEATORIC  # start
            labels[at + 2] = FORMAT  # `=`
            if table is not None:
                if follow(table, begin, hops) != answer:
                    raise ValueError(f"not a pointer_chase text: {query.group(0)!r} does not follow its table")
                labels[at + 3] = STEPS + hops
            labels[at + 4] = FORMAT  # space
    return labels


def _next_table(text: str, after: int) -> int:
    match = re.search(r"[a-z]>[a-z] ", text[after:])
    return len(text) if match is None else after + match.start()


def synthetic_source(spec: str) -> PointerChase:
    """`synthetic:pointer_chase` or `synthetic:pointer_chase:symbols=8,max_hops=4,...`."""
    name, _, options = spec.removeprefix(PREFIX).partition(":")
    if name != "pointer_chase":
        raise UserError(f"data_files {spec}: the synthetic tasks are: synthetic:pointer_chase")
    settings: dict[str, int] = {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if key not in PointerChase.__dataclass_fields__ or not value.lstrip("-").isdigit():
            raise UserError(
                f"data_files {spec}: {item!r} is not a setting: use e.g. "
                "synthetic:pointer_chase:symbols=8,max_hops=4,queries=16,n_docs=20000,seed=0"
            )
        settings[key] = int(value)
    return PointerChase(**settings)
