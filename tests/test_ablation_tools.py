"""Issue 14's tools: counterfactual gates (fair controls on the same weights), the collapse
metric, depth against independently measured difficulty, the log-score ponder loss, the
straight-through feedback, and a continued-pretraining start that equals the pretrained model."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
from decode_helpers import decode_incrementally, decode_rowwise
from halting import make_gates_halt

from ponder_lightning.callbacks import COLLAPSE_STEPS, GateHealthMonitor, gate_health
from ponder_lightning.gates import (
    AtThreshold,
    BottomKPonderLoss,
    FirstPassOnly,
    FixedRatioGate,
    FullDepth,
    MatchedRandomPruning,
    PerIterationMLPGate,
)
from ponder_lightning.models import AdaPonderLM, PonderLM2, PonderLM3, VanillaLM
from ponder_lightning.models.metrics import average_ranks, depth_by_decile, spearman

VOCAB = 256


def gated_model(
    bias: float = -3.0, tau: float = 0.05, feedback: str = "score", seed: int = 0, weight_std: float = 2.0
) -> AdaPonderLM:
    """Random gates whose scores straddle tau, so that a realistic share of tokens halts."""
    torch.manual_seed(seed)
    model = AdaPonderLM(size="tiny", vocab_size=VOCAB, gate=PerIterationMLPGate(tau=tau, feedback=feedback)).eval()
    return make_gates_halt(model, weight_std, bias)


def weight_one_gate(model) -> FixedRatioGate:
    """A gate without scores that halts nothing: every token fed back with weight 1."""
    gate = FixedRatioGate(target_depth=float(model.n_iterations))
    gate.bind(model.config.d_model, model.n_iterations - 1)
    return gate


def run(model, ids, gate=None):
    with torch.no_grad():
        hidden, trace = model.hidden_states(ids, gate=gate)
        return model.backbone.logits(hidden), trace


def test_a_control_whose_mask_coincides_reproduces_the_learned_gate():
    model = gated_model()
    ids = torch.randint(0, VOCAB, (3, 40))
    logits, trace = run(model, ids)
    assert 0.05 < 1 - trace.active_fractions()[-1] < 0.95, "the test needs partial halting"
    # The control machinery with the gate's own rule: identical outputs, halting included.
    same, same_trace = run(model, ids, AtThreshold(model.gate, model.gate.tau))
    assert torch.equal(same, logits) and all(
        torch.equal(a, b) for a, b in zip(same_trace.active, trace.active, strict=True)
    )
    # Random pruning keeps the learned scores: the first decision sees the same states.
    _, random_trace = run(model, ids, MatchedRandomPruning(model.gate, trace.active_fractions().tolist(), seed=3))
    assert torch.equal(random_trace.scores[0], trace.scores[0])
    assert not all(torch.equal(a, b) for a, b in zip(random_trace.active, trace.active, strict=True))


def test_random_pruning_does_not_replay_a_fixed_ratio_gates_training_draws():
    """A model trained with FixedRatioGate(seed=s) has adapted to those draws: random pruning
    with the same seed must not hand it back its own training mask (they agree only by chance)."""
    torch.manual_seed(0)
    model = AdaPonderLM(size="tiny", vocab_size=VOCAB, gate=FixedRatioGate(target_depth=2.5, seed=0)).eval()
    ids = torch.randint(0, VOCAB, (8, 256))
    _, trained = run(model, ids)
    fractions = trained.active_fractions().tolist()
    _, control = run(model, ids, MatchedRandomPruning(model.gate, fractions, seed=0))
    for i in range(1, model.n_iterations):
        p = fractions[i] / fractions[i - 1]  # chance of going on at decision i, given active before it
        before = trained.active[i - 1] & control.active[i - 1]
        agree = (trained.active[i] == control.active[i])[before].float().mean().item()
        assert agree < p**2 + (1 - p) ** 2 + 0.1, f"decision {i}: the control replays the training draws"


def test_random_pruning_with_nothing_to_halt_is_the_learned_gate_at_full_depth():
    """The old iso-FLOPs control swapped in FixedRatioGate, whose missing scores turned the
    feedback weight s into 1: a different model, not a different choice of tokens."""
    model = gated_model(bias=-1.0, tau=0.0)  # scores well below 1, nothing halts
    ids = torch.randint(0, VOCAB, (2, 30))
    learned, trace = run(model, ids)
    assert trace.depth().float().mean() == 4
    control, _ = run(model, ids, MatchedRandomPruning(model.gate, [1.0, 1.0, 1.0, 1.0]))
    assert torch.equal(control, learned)
    assert torch.equal(run(model, ids, FullDepth(model.gate))[0], learned)
    biased, _ = run(model, ids, weight_one_gate(model))
    assert (biased - learned).abs().max() > 1e-3


def test_first_pass_only_is_the_first_pass_and_full_depth_never_halts():
    model = gated_model()
    ids = torch.randint(0, VOCAB, (2, 30))
    first, first_trace = run(model, ids, FirstPassOnly(model.gate))
    assert first_trace.depth().eq(1).all()
    with torch.no_grad():
        one_pass = model.backbone.logits(model.backbone(model.backbone.embed_in(ids) * model.backbone.embed_scale))
    assert torch.allclose(first, one_pass, atol=1e-5)
    _, full_trace = run(model, ids, FullDepth(model.gate))
    assert full_trace.depth().eq(4).all()


def test_controls_decode_like_they_evaluate():
    """Each control is a gate like any other: decoding with it equals the teacher-forced forward."""
    model = gated_model()
    ids = torch.randint(0, VOCAB, (2, 24))
    control = MatchedRandomPruning(model.gate, [1.0, 0.7, 0.5, 0.3], seed=1)
    expected, trace = run(model, ids, control)
    model.effective_gate = lambda: control  # what `generate` would use
    got, depth, _ = decode_incrementally(model, ids, prefill=10)
    assert torch.allclose(got, expected, atol=1e-5) and torch.equal(depth, trace.depth())


@pytest.mark.parametrize("feedback", ["score", "straight_through"])
def test_decoding_equals_teacher_forced_at_realistic_halting(feedback):
    """Gate logits near tau (|logit - logit(tau)| small for many tokens) and 20-80% halting per
    decision: prefill, step-by-step and row-wise decoding equal the training forward."""
    model = gated_model(bias=-2.9, tau=0.05, feedback=feedback, seed=4, weight_std=0.3)
    ids = torch.randint(0, VOCAB, (3, 36))
    expected, trace = run(model, ids)
    fractions = trace.active_fractions()
    per_decision = [1 - float(fractions[i + 1] / fractions[i]) for i in range(3) if fractions[i] > 0]
    assert any(0.2 <= h <= 0.8 for h in per_decision), per_decision
    logits = torch.cat([s.flatten() for s in trace.scores]).clamp(1e-6, 1 - 1e-6).logit()
    assert ((logits - math.log(0.05 / 0.95)).abs() < 0.5).float().mean() > 0.2  # many scores near tau
    got, depth, _ = decode_incrementally(model, ids, prefill=12)
    assert torch.allclose(got, expected, atol=1e-5) and torch.equal(depth, trace.depth())
    rowwise, row_depth, _ = decode_rowwise(model, ids, prefill=12)
    assert torch.allclose(rowwise, expected[:, 12:], atol=1e-5) and torch.equal(row_depth, trace.depth()[:, 12:])


def test_straight_through_feeds_back_like_ponderlm_but_trains_the_gate():
    model = gated_model(bias=-1.0, tau=0.0, feedback="straight_through")
    ids = torch.randint(0, VOCAB, (2, 20))
    gated, _ = run(model, ids)
    ungated, _ = run(model, ids, weight_one_gate(model))
    assert torch.allclose(gated, ungated, atol=1e-5)
    model.train()
    loss, _, _ = model.training_loss(torch.randint(0, VOCAB, (2, 21)))
    loss.backward()
    assert all(mlp[2].weight.grad.abs().sum() > 0 for mlp in model.gate.mlps)


def test_gate_health_sees_a_collapsed_gate():
    model = gated_model(bias=-4.6, tau=1e-4, weight_std=0.05)  # s ~ 0.01: above tau, so nothing halts, but dead
    _, trace = run(model, torch.randint(0, VOCAB, (2, 30)))
    stats = gate_health(model.gate, trace)
    assert all(stats[f"weak_continuing_fraction/iter_{i}"] > 0.9 for i in range(3))
    assert all(stats[f"halted_fraction/iter_{i}"] == 0 for i in range(3))
    straight = gated_model(bias=-4.6, tau=1e-4, feedback="straight_through", weight_std=0.05)
    _, trace = run(straight, torch.randint(0, VOCAB, (2, 30)))
    assert all(gate_health(straight.gate, trace)[f"weak_continuing_fraction/iter_{i}"] == 0 for i in range(3))


@pytest.mark.parametrize(
    "bias, collapse, other, monitor",
    [
        (
            -4.6,
            "fed back with a gate score below",
            "one-pass model",
            GateHealthMonitor(),
        ),  # s ~ 0.01 > tau: dead passes
        (
            -12.0,
            "below 1.05 passes, a one-pass model",
            "fed back with",
            GateHealthMonitor(),
        ),  # s ~ 6e-6 < tau: all halt
        # Where one pass is the right depth, the threshold goes below it, and a gate halting
        # every token is then no collapse of this kind (the weak-feedback one does not fire either).
        (-12.0, None, "gate collapse", GateHealthMonitor(one_pass_depth=1.0)),
    ],
)
def test_training_with_a_collapsed_gate_warns_and_logs_gate_health(tmp_path, bias, collapse, other, monitor):
    model = gated_model(bias=bias, tau=1e-4, weight_std=0.05)
    model.regularizer = BottomKPonderLoss(k_max=0.1, ramp_steps=1)
    model.train()
    data = torch.utils.data.DataLoader([torch.randint(0, VOCAB, (33,)) for _ in range(4)], batch_size=2)
    trainer = L.Trainer(
        max_steps=COLLAPSE_STEPS + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        callbacks=[monitor],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, data)
    messages = [str(w.message) for w in caught if "gate collapse" in str(w.message)]
    if collapse is None:
        assert messages == []
    else:
        assert len(messages) == 1 and collapse in messages[0] and other not in messages[0], messages
    assert "train/gate/halted_fraction/iter_0" in trainer.callback_metrics
    assert "train/gate/ponder_loss/went_on_fraction" in trainer.callback_metrics
    if bias > -5:
        assert "train/gate/weak_continuing_fraction/iter_0" in trainer.callback_metrics


def test_log_score_operand_pushes_until_the_token_halts():
    scores = torch.tensor([[1e-3, 0.5, 0.9, 1e-5]]).logit().requires_grad_()
    active = [torch.ones(1, 4, dtype=torch.bool)]
    went_on = [torch.tensor([[True, True, True, False]])]  # the last one halted at this decision
    for operand in ("score", "log_score"):
        loss = BottomKPonderLoss(lam=1.0, k_max=0.5, ramp_steps=1, operand=operand)(
            [scores.sigmoid()], active, step=1, continuing=went_on
        )
        (grad,) = torch.autograd.grad(loss, scores)
        if operand == "score":  # the sigmoid's gradient vanishes near 0: s = 1e-3 is barely pushed
            assert 0 < grad[0, 0] < 1e-3
        else:  # a constant push in logit space for the entry that went on, none for the halted one
            assert math.isclose(float(grad[0, 0]), (1 - 1e-3) / math.log(1e4) / 2, rel_tol=1e-4)
            assert grad[0, 3] == 0 and grad[0, 1] == 0 and grad[0, 2] == 0


def test_spearman_and_deciles_against_hand_computed_values():
    x = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0])
    assert torch.equal(average_ranks(x), torch.tensor([1.0, 2.5, 2.5, 4.0, 5.0], dtype=torch.float64))
    assert spearman(x, x * 3 + 1) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    # Pearson of ranks [1, 2.5, 2.5, 4, 5] vs [2, 1, 3, 4, 5], by hand: 8 / sqrt(9.5 * 10).
    assert spearman(x, torch.tensor([2.0, 1.0, 3.0, 4.0, 5.0])) == pytest.approx(8 / math.sqrt(95))
    difficulty = torch.arange(100.0).flip(0)
    depth = torch.cat([torch.full((50,), 4.0), torch.full((50,), 1.0)])  # the hardest half runs 4 passes
    rows = depth_by_decile(difficulty, depth)
    assert [r["depth"] for r in rows] == [1.0] * 5 + [4.0] * 5
    assert rows[0]["difficulty"] == pytest.approx(4.5) and rows[-1]["difficulty"] == pytest.approx(94.5)


def test_continued_pretraining_starts_where_the_pretrained_model_is(tmp_path):
    from test_pretrained import VOCAB as NEOX_VOCAB
    from test_pretrained import hf_logits, save_tiny_neox

    original = save_tiny_neox(tmp_path / "pythia")
    model = AdaPonderLM(size="tiny", vocab_size=NEOX_VOCAB, pretrained=str(tmp_path / "pythia")).eval()
    assert model.hparams.scale_embeds is False  # resolved at construction and saved with the model
    ids = torch.randint(0, NEOX_VOCAB, (2, 24))
    first_pass, _ = run(model, ids, FirstPassOnly(model.gate))
    assert torch.allclose(first_pass, hf_logits(original, ids), atol=1e-5)
    scratch = AdaPonderLM(size="tiny", vocab_size=NEOX_VOCAB)
    assert scratch.hparams.scale_embeds is True and scratch.backbone.embed_scale == 8.0
    reloaded = AdaPonderLM(**dict(model.hparams, pretrained=None))  # how checkpoints and exports rebuild it
    assert reloaded.backbone.embed_scale == 1.0
    assert VanillaLM(size="tiny", vocab_size=NEOX_VOCAB, pretrained=str(tmp_path / "pythia"))  # unchanged
    # The latent-slot models too: their token slots' first pass is Pythia's forward.
    for latent_model in (PonderLM2, PonderLM3):
        start = latent_model(size="tiny", vocab_size=NEOX_VOCAB, pretrained=str(tmp_path / "pythia")).eval()
        assert start.hparams.scale_embeds is False
        with torch.no_grad():
            token_pass = start.backbone.logits(
                start.backbone(start.backbone.embed_in(ids) * start.backbone.embed_scale)
            )
        assert torch.allclose(token_pass, hf_logits(original, ids), atol=1e-5)
        assert latent_model(size="tiny", vocab_size=NEOX_VOCAB).backbone.embed_scale == math.sqrt(2.5 * 64)


def test_the_ponder_loss_makes_tokens_halt_and_the_passes_kept_matter():
    """No hand-set gate weights: the paper's recipe (scores as feedback weights, the bottom-K loss
    on s) trained from the default initialisation, where nothing halts, until tokens halt; the
    passes the continuing tokens still run must change their predictions (a collapsed gate
    would keep them at s ~ 0, and their outputs would equal the first pass's)."""
    torch.manual_seed(0)
    model = AdaPonderLM(
        size="tiny", vocab_size=VOCAB, lr=3e-3, regularizer=BottomKPonderLoss(lam=0.1, k_max=0.2, ramp_steps=10)
    )
    ids = torch.randint(0, VOCAB, (4, 32))
    assert run(model.eval(), ids)[1].depth().eq(4).all()  # nothing halts at initialisation
    data = torch.utils.data.DataLoader([torch.randint(0, VOCAB, (33,)) for _ in range(16)], batch_size=4)
    L.Trainer(
        max_steps=60, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    ).fit(model, data)
    logits, trace = run(model.eval(), ids)
    depth = trace.depth()
    assert (depth < 4).float().mean() > 0.05, trace.active_fractions()  # the ponder loss made tokens halt
    assert (depth > 1).float().mean() > 0.5
    first_pass, _ = run(model, ids, FirstPassOnly(model.gate))
    change = (logits - first_pass).abs().mean(-1)[depth > 1]  # per continuing token, mean |delta logit|
    assert change.mean() > 0.05, float(change.mean())
