"""Constraints on numeric constructor arguments, declared once in the type hints.

Every model, gate, regulariser and the DataModule annotates its numeric arguments with
jsonargparse's restricted types (`PositiveInt`, `ClosedUnitInterval`, ... or the few defined
here). The annotation does two jobs:

- the CLI (LightningCLI/jsonargparse) rejects a bad value while parsing, before anything is built
  or tokenised, and `--help` shows the constraint as the type;
- `check_init_args(Class, locals())` at the top of `__init__` applies the same annotation when the
  class is built from Python (type hints alone are not enforced there), raising one `UserError`
  that names the class, the argument and the allowed range.

A new argument gets its constraint by its annotation alone; nothing else needs to change:

    def __init__(self, tau: ClosedUnitInterval = 1e-4, hidden_mult: PositiveInt = 4) -> None:
        check_init_args(MyGate, locals())
"""

from __future__ import annotations

import inspect
import math
import tempfile
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jsonargparse.typing import restricted_number_type

from ponder_lightning.errors import UserError

#: Each restricted type's (number type, [(operator, bound), ...], join), recorded where it is
#: declared: jsonargparse keeps them only in private attributes of the type.
_RULES: dict[type, tuple[type, list[tuple[str, float]], str]] = {}


def restricted(name: str, base: type, rules: tuple[str, float] | list[tuple[str, float]], join: str = "and") -> type:
    """jsonargparse's restricted number type `name` (the same class as jsonargparse's own of that
    name and rules, which it registers once), with its rules recorded for `constraint_of`."""
    hint = restricted_number_type(name, base, rules, join=join)
    _RULES[hint] = (base, list(rules) if isinstance(rules, list) else [rules], join)
    return hint


# jsonargparse's own (`jsonargparse.typing`): restricted_number_type returns those very classes.
PositiveInt = restricted("PositiveInt", int, (">", 0))
NonNegativeInt = restricted("NonNegativeInt", int, (">=", 0))
PositiveFloat = restricted("PositiveFloat", float, (">", 0))
NonNegativeFloat = restricted("NonNegativeFloat", float, (">=", 0))
ClosedUnitInterval = restricted("ClosedUnitInterval", float, [(">=", 0), ("<=", 1)])
OpenUnitInterval = restricted("OpenUnitInterval", float, [(">", 0), ("<", 1)])
#: [0, 1): fractions that must leave something (val_fraction, BottomKGate's ratio, Adam's betas).
HalfOpenUnitInterval = restricted("HalfOpenUnitInterval", float, [(">=", 0), ("<", 1)])
#: Any real number but NaN and +-Inf (initial biases).
FiniteFloat = restricted("FiniteFloat", float, [(">", -math.inf), ("<", math.inf)])
#: >= 1 (mean depths: every token runs at least one pass).
AtLeastOneFloat = restricted("AtLeastOneFloat", float, (">=", 1))

__all__ = [
    "AtLeastOneFloat",
    "ClosedUnitInterval",
    "FiniteFloat",
    "HalfOpenUnitInterval",
    "NonNegativeFloat",
    "NonNegativeInt",
    "OpenUnitInterval",
    "PositiveFloat",
    "PositiveInt",
    "check_init_args",
    "constraint_of",
]


def is_restricted(hint: Any) -> bool:
    """Whether `hint` is one of the restricted number types declared here."""
    return isinstance(hint, type) and hint in _RULES


def constraint_of(hint: Any) -> str:
    """The restriction in words, e.g. `an int with v > 0` (for messages and tests)."""
    base, rules, join = _RULES[hint]
    rule = f" {join} ".join(f"v {op} {ref:g}" for op, ref in rules)
    return f"{'an int' if base is int else 'a number'} with {rule}"


def _violation(value: Any, hint: Any) -> str | None:
    """Why `value` does not fit `hint` (None when it does). Only restricted types, Optional/Union
    of them and tuples of them are checked; other hints are left to their own code."""
    if is_restricted(hint):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {constraint_of(hint)}"
        if _RULES[hint][0] is int and not float(value).is_integer():
            return f"must be {constraint_of(hint)}"
        try:
            hint(value)
        except (TypeError, ValueError):
            return f"must be {constraint_of(hint)}"
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        reasons = [_violation(value, a) for a in members]
        if any(r is None for r in reasons) or not any(is_restricted(a) or typing.get_args(a) for a in members):
            return None
        return next(r for r in reasons if r is not None) + (" (or null)" if type(None) in args else "")
    if origin in (tuple, list) and isinstance(value, (tuple, list)):
        variadic = origin is list or (len(args) == 2 and args[1] is Ellipsis)
        element_hints = [args[0]] * len(value) if variadic else list(args)
        # a tuple of the wrong length is left to jsonargparse: only the elements present are checked
        for i, (element, element_hint) in enumerate(zip(value, element_hints, strict=False)):
            reason = _violation(element, element_hint)
            if reason is not None:
                return f"has element {i} = {element!r}, which {reason.removeprefix('must')}".replace(
                    "which  ", "which must "
                )
    return None


def check_init_args(cls: type, values: Mapping[str, Any]) -> None:
    """Check the arguments of `cls.__init__` found in `values` (pass `locals()` first thing in
    `__init__`) against their restricted-type annotations; raise a `UserError` naming the first
    bad one."""
    hints = typing.get_type_hints(cls.__init__)
    owner = type(values["self"]).__name__ if "self" in values else cls.__name__
    for name in inspect.signature(cls.__init__).parameters:
        if name in hints and name in values:
            reason = _violation(values[name], hints[name])
            if reason is not None:
                raise UserError(f"{owner}: {name}={values[name]!r} is invalid: it {reason}; set {name} to such a value")


def check_writable_dir(path: Path) -> None:
    """Create `path` (and its parents) and check a file can be written in it; `ValueError` naming
    the path and the fix otherwise. Every command that writes checks its output this way before it
    loads a model or reads data."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file, not a directory: pass a directory to write into")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write_check_")
        probe.close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(f"{path} cannot be written ({reason}): pass a directory you can write to") from None
