"""Private internals of Lightning, jsonargparse and torch are reached from two adapter modules only
(`ponder_lightning/upstream.py` for Lightning, `ponder_lightning/nn/torch_internals.py` for torch),
and each name they rely on is still there in the installed versions: an upgrade that moves one
fails here, by name, rather than somewhere in resume or decoding."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.model_summary import ModelSummary

from ponder_lightning import upstream
from ponder_lightning.nn import torch_internals

ROOT = Path(__file__).resolve().parents[1] / "ponder_lightning"
ADAPTERS = {ROOT / "upstream.py", ROOT / "nn" / "torch_internals.py"}
LIBRARIES = ("lightning", "pytorch_lightning", "lightning_fabric", "jsonargparse", "torch")
#: Underscore names of other libraries, each with the reason no public one serves.
ALLOWED = {"_fingerprint": "datasets.Dataset's cache key (data/sources.py): datasets has no public one"}


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


@pytest.mark.parametrize(
    "owner, name, expected",
    [
        (LightningCLI, "_parse_ckpt_path", ["self"]),
        (ModelCheckpoint, "_save_checkpoint", ["self", "trainer", "filepath"]),
        (ModelCheckpoint, "_find_last_checkpoints", ["self", "trainer"]),
        (ModelCheckpoint, "_save_last_checkpoint", ["self", "trainer", "monitor_candidates"]),
        (ModelCheckpoint, "_monitor_candidates", ["self", "trainer"]),
        (RichProgressBar, "_get_train_description", ["self", "current_epoch"]),
        (RichProgressBar, "_update", ["self", "progress_bar_id", "current", "visible"]),
        (ModelSummary, "_get_summary_data", ["self"]),
        (upstream.ModelSummaryCallback, "_summary", ["self", "trainer", "pl_module"]),
    ],
)
def test_each_wrapped_lightning_method_is_there_with_the_arguments_used(owner, name, expected):
    assert parameters(getattr(owner, name))[: len(expected)] == expected  # more, with defaults, is fine


def test_each_wrapped_lightning_attribute_and_function_is_there():
    callback = ModelCheckpoint()
    assert callback._last_global_step_saved == 0 and callback._last_checkpoint_saved == ""
    assert upstream.ModelSummaryCallback(max_depth=2)._max_depth == 2
    assert upstream.ThroughputMonitor(batch_size_fn=len)._throughputs == {}
    model = LightningModule()
    assert model._trainer is None and upstream.attached_trainer(model) is None
    assert upstream.DISTRIBUTED_CHECKPOINT_METADATA == "meta.pt"
    assert parameters(upstream._given_hyperparameters_context) == ["hparams", "instantiator"]
    assert parameters(upstream._load_distributed_checkpoint) == ["checkpoint_folder"]
    source = inspect.getsource(upstream)
    assert all(name in source for name in upstream.private_names())


def test_the_hooks_route_lightnings_steps_to_their_public_names():
    class Recording(upstream.ModelCheckpointHooks):
        def write_checkpoint(self, trainer, filepath):
            self.written = filepath

        def find_last_checkpoints(self, trainer):
            return {"mine"}

    callback = Recording()
    callback._save_checkpoint(None, "x.ckpt")  # what Lightning calls
    assert callback.written == "x.ckpt" and callback._find_last_checkpoints(None) == {"mine"}


def test_torch_internals_compute_what_the_public_ops_do():
    torch.manual_seed(0)
    weight, bias, x = torch.randn(48, 32), torch.randn(48), torch.randn(5, 32)
    if torch_internals.has_packed_linear():
        packed = torch_internals.pack_linear_weight(weight, 5)
        out = torch_internals.packed_linear(x, packed, bias)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    before = torch_internals.version_of(weight)
    weight.mul_(2)
    assert torch_internals.version_of(weight) > before
    torch_internals.allow_compiled_graphs(64)
    assert torch._dynamo.config.recompile_limit >= 64


def own_names() -> set[str]:
    """Every name the package itself defines (functions, classes, variables, attributes it sets)."""
    names = set()
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.alias) and node.asname:
                names.add(node.asname)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return names


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_but_the_adapters_reaches_into_a_librarys_internals():
    own, found = own_names(), []
    for path in sorted(ROOT.rglob("*.py")):
        if path in ADAPTERS:
            continue
        where = path.relative_to(ROOT.parent)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIBRARIES:
                found += [f"{where}:{node.lineno}: imports {a.name}" for a in node.names if is_private(a.name)]
                if any(is_private(part) for part in (node.module or "").split(".")):
                    found.append(f"{where}:{node.lineno}: imports from {node.module}")
            elif isinstance(node, ast.Attribute) and is_private(node.attr):
                if node.attr not in own and node.attr not in ALLOWED:
                    found.append(f"{where}:{node.lineno}: .{node.attr}")
    assert not found, "use ponder_lightning/upstream.py (or nn/torch_internals.py) for:\n" + "\n".join(found)


def test_no_class_outside_the_adapters_overrides_a_librarys_private_method():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if path in ADAPTERS or path.name == "__main__.py":
            continue
        module_name = ".".join(("ponder_lightning", *path.relative_to(ROOT).with_suffix("").parts))
        module = importlib.import_module(module_name.removesuffix(".__init__"))
        for cls in vars(module).values():
            if not (inspect.isclass(cls) and cls.__module__ == module.__name__):
                continue
            foreign = [b for b in cls.__mro__[1:] if b.__module__.split(".")[0] in LIBRARIES]
            for name, value in vars(cls).items():  # methods written here (not the metaclass's own)
                written = getattr(value, "__module__", None) == module.__name__
                if written and is_private(name) and any(name in vars(base) for base in foreign):
                    found.append(f"{module.__name__}.{cls.__name__}.{name}")
    assert not found, "override the public name in ponder_lightning/upstream.py instead:\n" + "\n".join(found)
