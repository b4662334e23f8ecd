"""`ShuffledHalting`, the trained control of which tokens halt: the learned gate's scores and
feedback, the learned number of halting tokens, random choice. It must reproduce the learned
gate's forward whenever its mask coincides, halt exactly as many tokens otherwise, train its gate
through s, and build from its YAML overlay."""

from __future__ import annotations

import itertools

import pytest
import torch
from fit_helpers import ROOT, tiny_fit

from ponder_lightning.cli import run_lightning_cli
from ponder_lightning.gates import PerIterationMLPGate, ShuffledHalting
from ponder_lightning.models import AdaPonderLM

VOCAB = 128


def pair(tau: float) -> tuple[AdaPonderLM, AdaPonderLM]:
    """AdaPonderLM with a learned gate and the same model with that gate's halting shuffled,
    same weights."""
    torch.manual_seed(0)
    learned = AdaPonderLM(size="tiny", vocab_size=VOCAB, gate=PerIterationMLPGate(tau=tau, init_bias=0.0))
    shuffled = AdaPonderLM(size="tiny", vocab_size=VOCAB, gate=ShuffledHalting(PerIterationMLPGate(tau=tau)))
    state = {
        k.replace("gate.", "gate.base.", 1) if k.startswith("gate.") else k: v for k, v in learned.state_dict().items()
    }
    shuffled.load_state_dict(state)
    return learned.eval(), shuffled.eval()


def forward(model, ids):
    with torch.no_grad():
        hidden, trace = model.hidden_states(ids)
    return model.backbone.logits(hidden), trace


@pytest.mark.parametrize("tau", [0.0, 1.0])  # nothing halts / everything halts after one pass
def test_when_the_masks_coincide_the_forward_is_the_learned_gates(tau, single_thread):
    learned, shuffled = pair(tau)
    ids = torch.randint(0, VOCAB, (2, 16))
    (a, trace_a), (b, trace_b) = forward(learned, ids), forward(shuffled, ids)
    assert torch.equal(trace_a.depth(), trace_b.depth())
    assert torch.allclose(a, b, atol=1e-6)


def test_it_halts_as_many_tokens_as_the_gate_but_other_ones(single_thread):
    learned, shuffled = pair(0.5)  # scores near sigmoid(0) = 0.5: about half halt
    ids = torch.randint(0, VOCAB, (4, 32))
    (_, trace_a), (_, trace_b) = forward(learned, ids), forward(shuffled, ids)
    assert torch.allclose(trace_a.scores[0], trace_b.scores[0])  # the same gate on the same first pass
    halted = int((~trace_a.active[1]).sum())
    assert 0 < halted < ids.numel() and int((~trace_b.active[1]).sum()) == halted
    assert not torch.equal(trace_a.active[1], trace_b.active[1])
    for before, after in itertools.pairwise(trace_b.active):
        assert not (after & ~before).any()  # monotone


def test_its_gate_learns_through_the_feedback_scores(single_thread):
    _, shuffled = pair(0.5)
    shuffled.train()
    loss = shuffled.training_loss(torch.randint(0, VOCAB, (2, 17)))[0]  # CE alone: s reaches it through feedback
    loss.backward()
    grads = [p.grad for p in shuffled.gate.base.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


def test_the_yaml_overlay_builds_it(tmp_path, single_thread):
    cli = run_lightning_cli(
        ["fit", *tiny_fit("adaponderlm"), "--config", str(ROOT / "configs" / "gates" / "shuffled_halting.yaml")]
        + ["--trainer.fast_dev_run", "1", "--trainer.default_root_dir", str(tmp_path)]
    )
    assert isinstance(cli.model.gate, ShuffledHalting) and isinstance(cli.model.gate.base, PerIterationMLPGate)
    assert cli.trainer.global_step == 1
