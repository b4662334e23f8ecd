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

With `shuffle=1` the table's pairs come in random order (`d>a b>c f>b ...`), and its keys are
`ALEATORIC` too. This is the form on which depth is needed. In a sorted table, key x is always
at the same offset from the table's start, so a lookup is position arithmetic and one 2-layer
pass learns 2-hop answers (studies/two_hop_staircase.yaml). In a shuffled table a lookup is an
induction step: one attention layer finds the key's previous token, the next reads the value.
A 2-layer pass then has room for one hop, and k hops need k passes' worth of layers. A shuffled
table that comes out sorted by chance is read as a sorted one, with `FORMAT` keys.

`compose` (`synthetic:compose`): each document defines `functions` random permutations named
A, B, ... over the alphabet, then queries that apply k = 1..max_steps of them in reading order::

    A:ac bd ca db;B:ab bc cd da;C:ad bb cc da;|CAb=a Ba=b ABCc=b ...

(`CAb=a`: C(b) = c, then A(c) = a). Its answers are `STEPS + k` as well. It has no shortcut that
pointer_chase's short cycles give (a composition of distinct random permutations is a random
permutation), so one pass's accuracy on k >= 2 is at chance unless the model composes.

`label_text` labels a target only when everything it depends on is in the same block; a token
whose table entry or query start lies before the block's first token is `UNKNOWN` (blocks are cut
from the packed stream without regard to documents). The two families' texts never match each
other's patterns, so one `label_text` reads both.
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
    `queries` per document, `n_docs` documents from `seed`, tables in random order if `shuffle`."""

    symbols: int = 8
    max_hops: int = 4
    queries: int = 16
    n_docs: int = 20000
    seed: int = 0
    shuffle: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.symbols <= 26:
            raise UserError(f"pointer_chase symbols={self.symbols}: use 2 to 26 letters")
        if not 1 <= self.max_hops <= MAX_LABEL - STEPS:
            raise UserError(f"pointer_chase max_hops={self.max_hops}: use 1 to 9 (one digit)")
        if self.queries < 1 or self.n_docs < 1:
            raise UserError("pointer_chase queries and n_docs must be at least 1")
        if self.shuffle not in (0, 1):
            raise UserError(f"pointer_chase shuffle={self.shuffle}: use 1 (tables in random order) or 0 (sorted)")

    @property
    def name(self) -> str:
        return "synthetic:pointer_chase"

    def fingerprint(self) -> list[Any]:
        """What the token cache is keyed on: every setting of the generator."""
        settings = [self.symbols, self.max_hops, self.queries, self.n_docs, self.seed]
        return ["synthetic", "pointer_chase", *settings, *(["shuffle"] if self.shuffle else [])]

    def documents_text(self) -> Iterator[str]:
        rng = random.Random(self.seed)
        letters = string.ascii_lowercase[: self.symbols]
        for _ in range(self.n_docs):
            values = rng.sample(letters, len(letters))
            table = dict(zip(letters, values, strict=True))
            keys = rng.sample(letters, len(letters)) if self.shuffle else letters
            parts = [" ".join(f"{k}>{table[k]}" for k in keys), " |"]
            for _ in range(self.queries):
                hops, start = rng.randint(1, self.max_hops), rng.choice(letters)
                parts.append(f"{hops}{start}={follow(table, start, hops)} ")
            yield "".join(parts)

    def documents(self, text_field: str = "text") -> Iterator[str]:  # the `Source` protocol
        return self.documents_text()


@dataclass(frozen=True)
class Compose:
    """The composition generator (see the module docstring): `functions` permutations of
    `symbols` letters, queries of 1..`max_steps` functions, `queries` per document."""

    symbols: int = 6
    functions: int = 4
    max_steps: int = 4
    queries: int = 16
    n_docs: int = 20000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.symbols <= 26:
            raise UserError(f"compose symbols={self.symbols}: use 2 to 26 letters")
        if not 1 <= self.functions <= 26:
            raise UserError(f"compose functions={self.functions}: use 1 to 26 (named A..Z)")
        if not 1 <= self.max_steps <= MAX_LABEL - STEPS:
            raise UserError(f"compose max_steps={self.max_steps}: use 1 to 9")
        if self.queries < 1 or self.n_docs < 1:
            raise UserError("compose queries and n_docs must be at least 1")

    @property
    def name(self) -> str:
        return "synthetic:compose"

    def fingerprint(self) -> list[Any]:
        return [
            "synthetic",
            "compose",
            self.symbols,
            self.functions,
            self.max_steps,
            self.queries,
            self.n_docs,
            self.seed,
        ]

    def documents_text(self) -> Iterator[str]:
        rng = random.Random(self.seed)
        letters, names = string.ascii_lowercase[: self.symbols], string.ascii_uppercase[: self.functions]
        for _ in range(self.n_docs):
            tables = {name: dict(zip(letters, rng.sample(letters, len(letters)), strict=True)) for name in names}
            parts = [f"{name}:" + " ".join(k + v for k, v in table.items()) + ";" for name, table in tables.items()]
            parts.append("|")
            for _ in range(self.queries):
                chain = "".join(rng.choice(names) for _ in range(rng.randint(1, self.max_steps)))
                start = rng.choice(letters)
                parts.append(f"{chain}{start}={apply_chain(tables, chain, start)} ")
            yield "".join(parts)

    def documents(self, text_field: str = "text") -> Iterator[str]:  # the `Source` protocol
        return self.documents_text()


#: The synthetic tasks by name, with their settings' defaults.
TASKS: dict[str, type[PointerChase] | type[Compose]] = {"pointer_chase": PointerChase, "compose": Compose}


def apply_chain(tables: dict[str, dict[str, str]], chain: str, start: str) -> str:
    for name in chain:
        start = tables[name][start]
    return start


def passes_needed(labels: Any) -> Any:
    """Passes each target needs (LongTensor like `labels`): k for an answer of k steps, 1 for
    every other token (format and aleatoric tokens gain nothing from a second pass; unlabelled
    ones are not scored). What `gates.OracleDepth` halts by."""
    import torch

    labels = torch.as_tensor(labels)
    return torch.where(labels > STEPS, labels - STEPS, torch.ones_like(labels))


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
    """One label per character of `text` (one token each; any part of a synthetic stream):
    what predicting that character takes, from the text alone. Labels of a block's targets are
    those of its characters from the second on."""
    labels = [UNKNOWN] * len(text)
    _label_pointer_chase(text, labels)
    _label_compose(text, labels)
    return labels


_FUNCTION = re.compile(r"([A-Z]):((?:[a-z]{2} )*[a-z]{2});")
_CHAIN = re.compile(r"(?<![A-Za-z:])([A-Z]+)([a-z])=([a-z]) ")


def _label_compose(text: str, labels: list[int]) -> None:
    """Labels of compose documents (see the module docstring) in place."""
    tables: dict[str, dict[str, str]] = {}
    previous_end = -1
    for match in _FUNCTION.finditer(text):
        name, body, at = match.group(1), match.group(2), match.start()
        pairs = body.split(" ")
        # A table is known when its keys come in order from `a` (a cut one starts later).
        complete = "".join(p[0] for p in pairs) == string.ascii_lowercase[: len(pairs)]
        if name == "A":  # a new document
            tables = {}
        # The first name follows the end of a document, the others the previous table.
        labels[at] = FORMAT if name == "A" or previous_end == at else UNKNOWN
        labels[at + 1] = FORMAT  # `:`
        for i in range(len(pairs)):
            key = match.start(2) + 3 * i
            labels[key] = FORMAT if complete else UNKNOWN
            labels[key + 1] = ALEATORIC
            labels[key + 2] = FORMAT  # the space, or `;` after the last pair
        if complete:
            tables[name] = {p[0]: p[1] for p in pairs}
        previous_end = match.end()
        if text.startswith("|", previous_end):
            labels[previous_end] = FORMAT  # `|` after the last table
            _label_chains(text, labels, tables, previous_end + 1)


def _label_chains(text: str, labels: list[int], tables: dict[str, dict[str, str]], start: int) -> None:
    end = _FUNCTION.search(text, start)
    for query in _CHAIN.finditer(text, start, len(text) if end is None else end.start()):
        chain, begin, answer = query.group(1), query.group(2), query.group(3)
        at = query.start()
        for i in range(len(chain) + 1):
            labels[at + i] = ALEATORIC  # each function (and whether another comes), the start
        labels[query.start(3) - 1] = FORMAT  # `=`
        if all(name in tables for name in chain) and begin in tables[chain[0]]:
            if apply_chain(tables, chain, begin) != answer:
                raise ValueError(f"not a compose text: {query.group(0)!r} does not follow its tables")
            labels[query.start(3)] = STEPS + len(chain)
        labels[query.end() - 1] = FORMAT  # space


def _label_pointer_chase(text: str, labels: list[int]) -> None:
    """Labels of pointer_chase documents (see the module docstring) in place."""
    for table_match in re.finditer(r"((?:[a-z]>[a-z] )+)\|", text):
        body, start = table_match.group(1), table_match.start(1)
        pairs = [body[i : i + 3] for i in range(0, len(body), 4)]
        keys = "".join(p[0] for p in pairs)
        # A table is known when its pairs are a permutation (each key once, the values the same
        # letters) and it is whole: a sorted one cut by the block's start begins after `a`, a
        # shuffled one is whole when a document's end (EOS) comes just before it. (A cut shuffled
        # table that looks sorted is a closed part of its permutation: right for the queries that
        # start in it; the others are left unlabelled.)
        permutation = len(set(keys)) == len(keys) and set(keys) == {p[2] for p in pairs}
        ordered = permutation and keys == string.ascii_lowercase[: len(pairs)]
        shuffled = not ordered and permutation and start > 0 and text[start - 1] == "\x00"
        complete = ordered or shuffled
        for i in range(len(pairs)):
            at = start + 4 * i
            labels[at] = (ALEATORIC if shuffled else FORMAT) if complete else UNKNOWN
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
            if table is not None and begin in table:
                if follow(table, begin, hops) != answer:
                    raise ValueError(f"not a pointer_chase text: {query.group(0)!r} does not follow its table")
                labels[at + 3] = STEPS + hops
            labels[at + 4] = FORMAT  # space


def _next_table(text: str, after: int) -> int:
    match = re.search(r"[a-z]>[a-z] ", text[after:])
    return len(text) if match is None else after + match.start()


def synthetic_source(spec: str) -> PointerChase | Compose:
    """`synthetic:<task>` or `synthetic:<task>:setting=value,...`, a task of `TASKS`."""
    name, _, options = spec.removeprefix(PREFIX).partition(":")
    if name not in TASKS:
        raise UserError(f"data_files {spec}: the synthetic tasks are: {', '.join(PREFIX + task for task in TASKS)}")
    task = TASKS[name]
    settings: dict[str, int] = {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if key not in task.__dataclass_fields__ or not value.lstrip("-").isdigit():
            example = ",".join(f"{field}={getattr(task(), field)}" for field in task.__dataclass_fields__)
            raise UserError(
                f"data_files {spec}: {item!r} is not a setting of {name}: use e.g. {PREFIX}{name}:{example}"
            )
        settings[key] = int(value)
    return task(**settings)
