"""Reproduce ``ponder_lightning/assets/corpus/cpython_docs.jsonl.zst``, the embedded demo corpus.

The package needs real English text that works offline and is legal to redistribute. CPython ships
its own documentation with the interpreter (PSF License 2.0): the ``pydoc_data.topics`` reference
pages and the docstrings of the standard library. This script turns them into Pile-format records,
``{"text": ..., "meta": {"pile_set_name": "CPython docs"}}``, one per topic and one per module.

The output is deterministic for a given interpreter build (modules and members are visited in
sorted order, and no ``repr`` of runtime values is ever written, so no addresses or environment
leak in). The shipped file was built with CPython 3.11.7 on Linux:

    python scripts/build_corpus.py
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import pkgutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import zstandard

OUT = Path(__file__).resolve().parents[1] / "ponder_lightning/assets/corpus/cpython_docs.jsonl.zst"
META = {"pile_set_name": "CPython docs"}
# Modules with import side effects (printing, opening a browser), GUI/IDE code, test suites, build
# tooling that setuptools may shadow, per-codec boilerplate, and the topics we already include.
SKIP = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "distutils",
    "pydoc_data",
    "encodings",
    "test",
    "tests",
}


def topic_records() -> Iterator[str]:
    """The language reference pages behind ``help('TOPIC')``, in sorted topic order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name].strip()


def stdlib_module_names() -> list[str]:
    """Public stdlib modules and submodules, sorted; private, test and noisy trees excluded."""
    names: set[str] = set()
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in SKIP or importable(top) is None:
            continue
        names.add(top)
        module = importable(top)
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), prefix=top + ".", onerror=lambda _: None):
            parts = info.name.split(".")
            if not any(p.startswith("_") or p in SKIP for p in parts):
                names.add(info.name)
    return sorted(names)


def importable(name: str) -> ModuleType | None:
    """Import quietly; platform-specific or broken modules yield None and are skipped."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:  # noqa: BLE001 - any import failure just means "not on this platform"
            return None


def own_doc(obj: object) -> str | None:
    """The object's own docstring (never one inherited from a base class), cleaned."""
    if not isinstance(getattr(obj, "__doc__", None), str):
        return None
    doc = inspect.getdoc(obj)
    return doc.strip() if doc and doc.strip() else None


def params(obj: object) -> str:
    """Parameter names only: default values are runtime reprs that may hold paths or addresses."""
    try:
        sig = inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)"
    prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    parts = [
        prefix.get(p.kind, "") + p.name + ("=..." if p.default is not p.empty else "") for p in sig.parameters.values()
    ]
    return "(" + ", ".join(parts) + ")"


def indent(text: str, depth: int) -> str:
    pad = "    " * depth
    return "\n".join(pad + line if line else line for line in text.splitlines())


def module_record(name: str, module: ModuleType, seen: set[int]) -> str | None:
    """One module's docs as plain text: module docstring, then its classes and functions."""
    module_doc = own_doc(module)
    parts = [f"Module {name}\n\n{module_doc}" if module_doc else f"Module {name}"]
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or id(obj) in seen or getattr(obj, "__module__", None) != name:
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        seen.add(id(obj))
        if inspect.isclass(obj):
            parts.append(class_text(name, attr, obj))
        elif doc := own_doc(obj):
            parts.append(f"{name}.{attr}{params(obj)}\n{indent(doc, 1)}")
    parts = [p for p in parts if p]
    return "\n\n".join(parts) if module_doc or len(parts) > 1 else None


def class_text(module: str, name: str, cls: type) -> str:
    """A class docstring followed by the docstrings of the public methods it defines itself."""
    lines = []
    if doc := own_doc(cls):
        lines.append(f"class {module}.{name}\n{indent(doc, 1)}")
    for attr, member in sorted(vars(cls).items()):
        if attr.startswith("_") or not inspect.isroutine(member):
            continue
        if doc := own_doc(member):
            lines.append(f"    {name}.{attr}{params(getattr(cls, attr))}\n{indent(doc, 2)}")
    return "\n\n".join(lines)


def records() -> Iterator[str]:
    yield from topic_records()
    seen: set[int] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # attribute access on deprecated modules (typing.io) warns
        for name in stdlib_module_names():
            module = importable(name)
            if module is not None and (text := module_record(name, module, seen)):
                yield text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    lines = [json.dumps({"text": text, "meta": META}, ensure_ascii=False) + "\n" for text in records()]
    payload = "".join(lines).encode("utf-8")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(zstandard.ZstdCompressor(level=19).compress(payload))
    print(f"wrote {args.out}: {len(lines)} records, {len(payload)} bytes raw, {args.out.stat().st_size} compressed")


if __name__ == "__main__":
    main()
