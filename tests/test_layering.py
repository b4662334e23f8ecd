"""The package's layers: imports go one way, down.

A *unit* is the first component of a module's name under ``ponder_lightning`` (``nn`` for
``ponder_lightning.nn.backbone``); the package's own ``__init__`` is the unit ``ponder_lightning``.
The checkpoint package ``io`` spans two floors, so each of its modules is a unit of its own
(``io.formats``; its ``__init__`` is ``io``). Each unit sits in one layer, lowest first:

- L0 ``errors``, ``validation``, ``ponder_lightning`` (``__version__``): what everything shares;
- L1 ``nn``: the networks in plain PyTorch. No Lightning, and of this package only ``errors``
  and ``validation`` (the gate protocol the recurrences call is ``nn/gate.py``, not ``gates/``);
- L2 ``gates``, ``data``, ``flops``, ``parallel``, ``training``, ``parser_errors``: the parts a
  model is built from or trained with; what a model reads at its start and on resume,
  ``io.formats``, ``io.safe``, ``io.compat``; and ``upstream``, the one module that touches
  Lightning's internals (tests/test_upstream.py). ``data`` imports Lightning only in its DataModule
  (``data/datamodule.py``); tokenising, packing and sampling are plain Python;
- L3 ``models``: the LightningModules;
- L4 what works on a built or saved model: ``io.load`` (rebuild a model from a checkpoint or an
  export), ``io.export``, ``io.hf_modeling``, ``io`` (its two entries), ``generate``,
  ``evaluate``, ``callbacks``, ``progress``, ``cli_errors``, ``lm_eval_adapter``;
- L5 the library's command line: ``cli``;
- L6 the laboratory, above the library: ``research`` (studies, the gate study's rankings and
  probes, the command line with them); nothing below imports it;
- L7 ``__main__``: ``python -m ponder_lightning``, the research layer's command line.

The rule: a module imports from its own unit, from units of lower layers, and from other units
of its own layer, and the graph of units has no cycle (so two units of one layer never import
each other, even through a third). An entry point that must call one above it takes it as an
argument (``cli.evaluate_command`` is handed the research layer's ``gate_study``).

Every import counts: at module level, inside functions, under ``try`` or ``if TYPE_CHECKING``,
``import x``, ``from x import y`` and relative imports. A new top-level module or package needs a
line in ``LAYERS``.
"""

from __future__ import annotations

import ast
import itertools
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "ponder_lightning"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

LAYERS: dict[str, int] = {
    **dict.fromkeys(["errors", "validation", PACKAGE], 0),
    "nn": 1,
    **dict.fromkeys(
        ["gates", "data", "flops", "parallel", "training", "parser_errors", "upstream"]
        + ["io.formats", "io.safe", "io.compat"],
        2,
    ),
    "models": 3,
    **dict.fromkeys(
        [
            "callbacks",
            "io",
            "io.load",
            "io.export",
            "io.hf_modeling",
            "cli_errors",
            "depth_map",
            "evaluate",
            "generate",
            "lm_eval_adapter",
            "progress",
        ],
        4,
    ),
    "cli": 5,
    "research": 6,
    "__main__": 7,
}
#: Packages whose modules are units of their own (they span floors).
SPLIT_PACKAGES = {"io"}
#: Distributions of the Lightning family (``lightning``, its parts and ``torchmetrics``).
LIGHTNING = {"lightning", "pytorch_lightning", "lightning_fabric", "lightning_utilities", "torchmetrics"}
#: What ``nn`` may import of this package besides itself.
NN_ALLOWED = {"nn", "errors", "validation"}
#: The one module of ``data`` that may import Lightning.
DATA_LIGHTNING_MODULE = f"{PACKAGE}.data.datamodule"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. ponder_lightning.models.base
    where: str  # file:line
    target: str  # the imported module (or package attribute) as written, relative imports resolved


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, filename: str, is_package: bool = False) -> list[Import]:
    """Every import in `source` (the text of `module`), wherever it is in the file."""
    found = []
    nodes = [n for n in ast.walk(ast.parse(source, filename)) if isinstance(n, (ast.Import, ast.ImportFrom))]
    for node in sorted(nodes, key=lambda n: (n.lineno, n.col_offset)):
        where = f"{filename}:{node.lineno}"
        if isinstance(node, ast.Import):
            found += [Import(module, where, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            # `from ponder_lightning import flops` imports the unit flops, not the package root.
            found += [Import(module, where, f"{target}.{alias.name}") for alias in node.names if alias.name != "*"]
            if any(alias.name == "*" for alias in node.names):
                found.append(Import(module, where, target))
    return found


def unit_of(target: str, root: Path = ROOT) -> str | None:
    """The unit of this package that `target` (a module, or a module's attribute) lies in; None
    for other distributions."""
    parts = target.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1:
        return PACKAGE
    name = parts[1]
    if name in SPLIT_PACKAGES:  # a module of it, or an attribute of its __init__
        if len(parts) > 2 and (root / name / f"{parts[2]}.py").is_file():
            return f"{name}.{parts[2]}"
        return name
    if (root / f"{name}.py").is_file() or (root / name / "__init__.py").is_file():
        return name
    return PACKAGE  # an attribute of the package's __init__ (`from ponder_lightning import __version__`)


def all_imports(root: Path = ROOT) -> list[Import]:
    found = []
    for path in sorted(root.rglob("*.py")):
        filename = f"{PACKAGE}/{path.relative_to(root).as_posix()}"
        found += imports_of(path.read_text(), module_name(path, root), filename, path.name == "__init__.py")
    return found


def unit_edges(imports: list[Import]) -> dict[tuple[str, str], list[Import]]:
    edges: dict[tuple[str, str], list[Import]] = defaultdict(list)
    for imp in imports:
        source, target = unit_of(imp.module), unit_of(imp.target)
        if target is not None and target != source:
            edges[(source, target)].append(imp)
    return edges


def find_cycle(edges: dict[tuple[str, str], list[Import]]) -> list[str] | None:
    """A cycle of units (first unit repeated at the end), or None."""
    graph: dict[str, list[str]] = defaultdict(list)
    for source, target in sorted(edges):
        graph[source].append(target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(unit: str) -> list[str] | None:
        state[unit] = 1
        path.append(unit)
        for nxt in graph[unit]:
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[unit] = 2
        return None

    for unit in sorted(graph):
        if unit not in state and (cycle := visit(unit)):
            return cycle
    return None


def describe(imp: Import) -> str:
    source, target = unit_of(imp.module), unit_of(imp.target)
    return (
        f"{imp.where}: {source} (L{LAYERS.get(source, '?')}) "
        f"imports {imp.target} ({target}, L{LAYERS.get(target, '?')})"
    )


# -- the rules ------------------------------------------------------------------------------------
def test_every_unit_has_a_layer():
    units = {unit_of(module_name(p)) for p in ROOT.rglob("*.py")}
    missing = sorted(u for u in units if u not in LAYERS)
    stale = sorted(u for u in LAYERS if u not in units)
    if missing:
        pytest.fail(
            f"units without a layer: {missing}: add them to LAYERS in tests/test_layering.py (and its docstring)",
            pytrace=False,
        )
    if stale:
        pytest.fail(f"LAYERS names units that no longer exist: {stale}", pytrace=False)


def test_no_unit_imports_a_higher_layer():
    upward = [
        imp
        for (source, target), imps in unit_edges(all_imports()).items()
        if LAYERS.get(target, 0) > LAYERS.get(source, 0)
        for imp in imps
    ]
    if upward:
        pytest.fail(
            "imports from a higher layer (see tests/test_layering.py's docstring):\n"
            + "\n".join(map(describe, upward)),
            pytrace=False,
        )


def test_units_import_each_other_without_a_cycle():
    edges = unit_edges(all_imports())
    cycle = find_cycle(edges)
    if cycle is not None:
        lines = [
            f"  {a} -> {b}: " + ", ".join(imp.where for imp in edges[(a, b)]) for a, b in itertools.pairwise(cycle)
        ]
        pytest.fail(f"the units import each other in a cycle {' -> '.join(cycle)}:\n" + "\n".join(lines), pytrace=False)


def test_nn_is_plain_pytorch():
    bad = []
    for imp in all_imports():
        if unit_of(imp.module) != "nn":
            continue
        unit = unit_of(imp.target)
        if imp.target.split(".")[0] in LIGHTNING:
            bad.append(f"{imp.where}: nn imports {imp.target} (nn is plain PyTorch: no Lightning)")
        elif unit is not None and unit not in NN_ALLOWED:
            bad.append(
                f"{imp.where}: nn imports {imp.target} (of this package "
                f"nn may import only {sorted(NN_ALLOWED - {'nn'})})"
            )
    if bad:
        pytest.fail("\n".join(bad), pytrace=False)


def test_data_imports_lightning_only_in_its_datamodule():
    bad = [
        f"{imp.where}: {imp.module} imports {imp.target} (only {DATA_LIGHTNING_MODULE} may)"
        for imp in all_imports()
        if unit_of(imp.module) == "data"
        and imp.module != DATA_LIGHTNING_MODULE
        and imp.target.split(".")[0] in LIGHTNING
    ]
    if bad:
        pytest.fail("\n".join(bad), pytrace=False)


# -- the walker itself ----------------------------------------------------------------------------
def test_the_walker_sees_every_kind_of_import():
    source = (
        "import ponder_lightning.nn.backbone\n"
        "from ponder_lightning import flops, __version__\n"
        "from . import metrics\n"
        "from ..gates import Gate\n"
        "try:\n    import lightning as L\nexcept ImportError:\n    pass\n"
        "def f():\n    from ponder_lightning.io.load import load_checkpoint\n"
        "class C:\n    def g(self):\n        import ponder_lightning.cli\n"
    )
    found = imports_of(source, f"{PACKAGE}.models.base", "ponder_lightning/models/base.py")
    assert [(imp.where.rsplit(":", 1)[1], imp.target, unit_of(imp.target)) for imp in found] == [
        ("1", "ponder_lightning.nn.backbone", "nn"),
        ("2", "ponder_lightning.flops", "flops"),
        ("2", "ponder_lightning.__version__", PACKAGE),
        ("3", "ponder_lightning.models.metrics", "models"),
        ("4", "ponder_lightning.gates.Gate", "gates"),
        ("6", "lightning", None),
        ("10", "ponder_lightning.io.load.load_checkpoint", "io.load"),
        ("13", "ponder_lightning.cli", "cli"),
    ]
    assert imports_of("from . import backbone\n", f"{PACKAGE}.nn", "ponder_lightning/nn/__init__.py", is_package=True)[
        0
    ].target == ("ponder_lightning.nn.backbone")


def test_find_cycle_names_the_cycle():
    imp = Import("m", "f.py:1", "t")
    assert find_cycle({("a", "b"): [imp], ("b", "c"): [imp]}) is None
    assert find_cycle({("a", "b"): [imp], ("b", "c"): [imp], ("c", "a"): [imp]}) == ["a", "b", "c", "a"]
