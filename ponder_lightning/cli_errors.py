"""One short line for a bad flag of an entry point: `bounded` and the other argparse `type`s
below, shared by `cli` and `lm_eval_adapter` (a bad config's line is `parser_errors`')."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from ponder_lightning.io.safe import TRUST_FLAG
from ponder_lightning.validation import check_writable_dir


# -- argparse `type`s of the entry points' flags: a bad value is one `error: argument --x: ...` line
def bounded(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False):
    """An argparse `type` that parses `kind` and rejects values outside [low, high] (or (low, high]):
    argparse then prints one `error: argument --x: ...` line after the usage line."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an int' if kind is int else 'a number'}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"<= {high}"
            raise argparse.ArgumentTypeError(
                f"{value} is out of range: use a value {' and '.join(filter(None, [lo, hi]))}"
            )
        return value

    parse.__name__ = kind.__name__
    return parse


def non_empty_text(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("the prompt is empty: give some text to continue")
    return text


def unit_interval_list(text: str, what: str, example: str) -> list[float]:
    """Comma-separated numbers in [0, 1]; a bad one is named with the whole list and an example."""
    parse = bounded(float, 0.0, 1.0)
    try:
        return [parse(t.strip()) for t in text.split(",")]
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(
            f"{err} (in {text!r}; use comma-separated {what} in [0, 1], e.g. {example})"
        ) from None


def tau_list(text: str) -> list[float]:
    """`--tau 1e-4,1e-3`: comma-separated halting thresholds in [0, 1]."""
    return unit_interval_list(text, "thresholds", "1e-4,1e-3")


def active_fractions(text: str) -> list[float]:
    """`--active 1,0.9,0.8`: the fraction of tokens active at each iteration; every token runs the
    first, and a token that halts never comes back, so 1 first and never increasing."""
    fractions = unit_interval_list(text, "fractions", "1,0.9,0.7")
    if fractions[0] != 1.0 or any(b > a for a, b in itertools.pairwise(fractions)):
        raise argparse.ArgumentTypeError(
            f"{text!r}: every token runs the first iteration and a halted token never comes back: "
            "start at 1 and never increase, e.g. 1,0.9,0.7"
        )
    return fractions


def output_dir(text: str) -> str:
    """A directory to write into, created now (`check_writable_dir`): refused up front, not after
    the work whose results it would hold."""
    try:
        check_writable_dir(Path(text).expanduser())
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def output_file(text: str) -> str:
    """A file to write: its directory created and writable now, and the name not a directory."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory: pass a file name to write, e.g. {text}/results.json")
    try:
        check_writable_dir(path.parent)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    """`--trust_checkpoint`, for every command that opens a checkpoint (`safe_load`)."""
    parser.add_argument(
        TRUST_FLAG,
        action="store_true",
        help="read a checkpoint that holds more than tensors and plain data with the unrestricted "
        "unpickler (it can run code): only for a file from a trusted source",
    )


def count_or_fraction(text: str) -> int | float:
    """`--limit 100` (examples) or `--limit 0.1` (a fraction of each task)."""
    value = bounded(float, 0.0, low_open=True)(text)
    if value >= 1 and value != int(value):
        raise argparse.ArgumentTypeError(f"{text}: use a whole number of examples or a fraction below 1")
    return value if value < 1 else int(value)
