"""One line for a jsonargparse error: the full dotted key, the reason, and where the value came
from (the command line or the YAML file that set it), instead of jsonargparse's usage text and
nested report; a YAML syntax error names the file and line instead of `"<unicode string>"`.

jsonargparse reports a bad value deep inside a subclass (`model.init_args.gate.init_args.tau`) as
a ~20-line tree of every alternative it tried (the class, or None), printed under ~60 lines of
usage. It has no structured form of that report, so its text is read here, in one place, and
`tests/test_user_errors.py` fails the day its wording changes. Used by the command line (a bad
config) and by `io.load` (saved arguments that no longer validate): neither owns the other's errors.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

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
