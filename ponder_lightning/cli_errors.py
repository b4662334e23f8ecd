"""One short line for a command-line mistake: a config-parser error, instead of jsonargparse's
usage text and nested report, and a bad flag of an entry point (`bounded` and the other argparse
`type`s below, shared by `cli` and `lm_eval_adapter`).

jsonargparse reports a bad value deep inside a subclass (`model.init_args.gate.init_args.tau`) as
a ~20-line tree of every alternative it tried (the class, or None), printed under ~60 lines of
usage. `parser_error_message` keeps what a user needs: the full dotted key, the reason, and where
the value came from (the command line or the YAML file that set it); a YAML syntax error names the
file and line instead of `"<unicode string>"`.
"""

from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path
from typing import Any

import yaml

from ponder_lightning.safe_load import TRUST_FLAG
from ponder_lightning.validation import check_writable_dir

_KEY = re.compile(r'^(\s*)(?:- )?Parser key "([^"]+)":\s*(.*)$')
_CLASS = re.compile(r"^(\s*)- Problem with given class_path '([^']+)':\s*$")
_NOISE = (
    "Does not validate against any of",
    "Subtypes:",
    "Errors:",
    "- Expected a <class 'NoneType'>",
    "Given value type:",
    "Given value:",
)
_RESTRICTION = re.compile(r"Not of type (\w+): (.+?) does not conform to restriction (.+)$")


def config_files(argv: list[str]) -> list[str]:
    """The `--config`/`-c` files in `argv`, in the order they are merged."""
    files, take = [], False
    for arg in argv:
        if take:
            files.append(arg)
            take = False
        elif arg in ("--config", "-c"):
            take = True
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def yaml_syntax_error(argv: list[str]) -> str | None:
    """The first `--config` file that is not valid YAML, as `FILE line L, column C: problem`."""
    for name in config_files(argv):
        try:
            yaml.safe_load(Path(name).read_text())
        except OSError:
            continue
        except yaml.MarkedYAMLError as exc:
            mark = exc.context_mark or exc.problem_mark  # where the broken construct starts
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = " ".join(filter(None, [exc.context, exc.problem]))
            return f"{name}{where}: invalid YAML ({problem}): fix the file's syntax"
        except yaml.YAMLError as exc:
            return f"{name}: invalid YAML ({exc}): fix the file's syntax"
    return None


def _lookup(tree: Any, keys: list[str]) -> bool:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def where_set(key: str, argv: list[str]) -> str:
    """' (set on the command line)' or ' (set in FILE)' for the last source of `key`, else ''."""
    for arg in reversed(argv):
        if arg.startswith(f"--{key}") and (arg == f"--{key}" or arg[len(key) + 2] in "=."):
            return " (set on the command line)"
    parts = key.split(".")
    for name in reversed(config_files(argv)):
        try:
            tree = yaml.safe_load(Path(name).read_text())
        except (OSError, yaml.YAMLError):
            continue
        # A file may also nest its keys under the subcommand (`fit: {model: ...}`).
        if _lookup(tree, parts) or (
            isinstance(tree, dict) and any(_lookup(v, parts) for v in tree.values() if isinstance(v, dict))
        ):
            return f" (set in {name})"
    return ""


def _reason(text: str, given: str | None) -> str:
    match = _RESTRICTION.search(text) or _RESTRICTION.search(text.replace(": does not", ": ? does not"))
    if match:
        kind, value, rule = match.groups()
        value = given if value == "?" and given is not None else value
        return f"got {value}, but it must be a {kind} ({rule.replace('v', 'value')})"
    return text.removeprefix("- ")


def _given_value(lines: list[str]) -> str | None:
    """The first `Given value: X` after a leaf (jsonargparse omits falsy values such as 0 from the
    leaf itself)."""
    for line in lines:
        if line.strip().startswith("Given value:"):
            return line.strip().removeprefix("Given value:").strip()
    return None


def parser_error_message(message: str, argv: list[str]) -> str:
    """One line for jsonargparse's error `message` from parsing `argv`."""
    if "Problems parsing config" in message:
        syntax = yaml_syntax_error(argv)
        if syntax is not None:
            return syntax
    stack: list[tuple[int, str]] = []
    lines = message.splitlines()
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key, cls = _KEY.match(line), _CLASS.match(line)
        if cls:
            stack.append((indent, f"init_args={cls.group(2)}"))
            continue
        if key:
            stack.append((indent, key.group(2)))
            rest = key.group(3).strip()
            if not rest:
                continue
            text = rest
        elif any(line.strip().startswith(noise) for noise in _NOISE):
            continue
        else:
            text = line.strip()
        dotted = ".".join(name.split("=")[0] for _, name in stack)
        option = re.match(r"Option '([^']+)' is not accepted", text)
        if option:
            field = f"{dotted}.{option.group(1)}" if dotted else option.group(1)
            owner = next((name.split("=", 1)[1].rsplit(".", 1)[-1] for _, name in reversed(stack) if "=" in name), None)
            return (
                f"{field}: {owner or 'this class'} has no argument {option.group(1)!r}{where_set(field, argv)}: "
                "check its spelling (--help lists the arguments)"
            )
        if stack and stack[-1][1].startswith("init_args="):  # the class itself failed (import, ...)
            owner = ".".join(name.split("=")[0] for _, name in stack[:-1])
            class_path = stack[-1][1].split("=", 1)[1]
            return (
                f"{owner}.class_path={class_path}: {text}{where_set(owner, argv)}: "
                "give an importable subclass with that class_path"
            )
        if dotted == "config":
            return f"--config: {text}"
        reason = _reason(text, _given_value(lines[number + 1 :]))
        return f"{dotted}: {reason}{where_set(dotted, argv)}" if dotted else reason
    return message.strip().splitlines()[0] if message.strip() else "invalid arguments"


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
