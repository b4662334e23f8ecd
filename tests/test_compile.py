"""`compile`: each decoder layer compiled with fullgraph=True for training steps.

Dynamo traces each block whole or raises (fullgraph), so these tests fail on any graph break
inside a block: with and without the training-time KV alignment hook, PonderLM-3's key bias,
padding masks and activation checkpointing. The `eager` backend runs the traced graph as is, so
the compiled step must equal the eager one; inductor's speed is measured in
benchmarks/compile_speed.py, not here.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch._dynamo.utils import counters

from ponder_lightning.models import AdaPonderLM, LoopTransformer, PonderLM2, PonderLM3, VanillaLM
from ponder_lightning.nn.backbone import Backbone, CompiledWhenTraining

VOCAB = 64
CASES = {
    "vanilla-checkpointed": lambda: VanillaLM(size="tiny", vocab_size=VOCAB, activation_checkpointing=True),
    "adaponderlm": lambda: AdaPonderLM(size="tiny", vocab_size=VOCAB, pondering_steps=2),
    "loop-llama": lambda: LoopTransformer(size="llama-tiny", vocab_size=VOCAB, loops=2, input_injection=True),
    "ponderlm2": lambda: PonderLM2(size="tiny", vocab_size=VOCAB),
    "ponderlm3": lambda: PonderLM3(size="llama-tiny", vocab_size=VOCAB),
}


def batch(padded: bool) -> torch.Tensor | dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, 17))
    if not padded:
        return ids
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding in row 0
    return {"input_ids": ids, "attention_mask": mask}


def loss_and_grads(model, data) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    ce, _, trace = model.training_loss(data)
    aux = model.aux_loss(trace)
    loss = ce if aux is None else ce + aux
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
def test_compiled_training_step_has_no_graph_break_and_equals_eager(name, padded):
    torch.manual_seed(0)
    eager = CASES[name]().train()
    torch.manual_seed(0)
    compiled = CASES[name]().train()
    compiled.backbone.compile_layers(backend="eager")
    assert all(isinstance(layer.forward, CompiledWhenTraining) for layer in compiled.backbone.layers)
    data = batch(padded)
    loss, grads = loss_and_grads(eager, data)
    compiled_loss, compiled_grads = loss_and_grads(compiled, data)  # raises on a graph break (fullgraph)
    assert torch.allclose(compiled_loss, loss, atol=1e-6, rtol=0)
    for got, want in zip(compiled_grads, grads, strict=True):
        assert got is not None and torch.allclose(got, want, atol=1e-6, rtol=1e-5)


def test_recompilations_are_bounded():
    """Steps of one shape compile once; no-grad forwards (validation, decoding) never compile."""
    torch.manual_seed(0)
    model = AdaPonderLM(size="tiny", vocab_size=VOCAB, pondering_steps=2).train()
    model.backbone.compile_layers(backend="eager")
    loss_and_grads(model, batch(False))
    compiled_frames = counters["stats"]["unique_graphs"]
    for _ in range(3):
        loss_and_grads(model, batch(False))
    with torch.no_grad():
        model.eval()(torch.randint(0, VOCAB, (3, 9)))
    assert counters["stats"]["unique_graphs"] == compiled_frames


def test_fit_with_compile(monkeypatch, tmp_path):
    """`compile: true` through Lightning: configure_model compiles the layers, training runs."""
    monkeypatch.setattr(Backbone.compile_layers, "__defaults__", ("eager",))  # inductor's C++ build is slow here
    torch.manual_seed(0)
    model = AdaPonderLM(size="tiny", vocab_size=VOCAB, pondering_steps=2, compile=True)
    data = torch.utils.data.DataLoader([torch.randint(0, VOCAB, (17,)) for _ in range(8)], batch_size=4)
    trainer = L.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    trainer.fit(model, train_dataloaders=data)
    assert all(isinstance(layer.forward, CompiledWhenTraining) for layer in model.backbone.layers)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
