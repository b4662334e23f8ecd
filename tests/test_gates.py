"""Gates and the ponder regulariser in isolation (docs/method.md §4.2 steps d-e, §4.3, §4.7)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ponder_lightning.gates import (
    AlwaysContinue,
    BottomKGate,
    BottomKPonderLoss,
    FixedRatioGate,
    NoPonderLoss,
    PerIterationMLPGate,
    SingleMLPGate,
)
from ponder_lightning.gates.fixed import active_fractions, token_uniform

D = 64


pytestmark = pytest.mark.usefixtures("single_thread")


def hidden(b: int, t: int) -> torch.Tensor:
    """Hidden states as the gate sees them: after the final LayerNorm."""
    return F.layer_norm(torch.randn(b, t, D), (D,))


def spread_scores(gate, scale: float = 1.0) -> None:
    """Make the last MLP layer(s) input-dependent enough that scores cover most of (0, 1)."""
    mlps = gate.mlps if hasattr(gate, "mlps") else [gate.mlp]
    with torch.no_grad():
        for mlp in mlps:
            mlp[2].weight.normal_(0.0, scale)
            mlp[2].bias.zero_()


def positions(b: int, t: int) -> torch.Tensor:
    return torch.arange(t).expand(b, t)


def all_active(b: int, t: int) -> torch.Tensor:
    return torch.ones(b, t, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# 7. PerIterationMLPGate / SingleMLPGate / AlwaysContinue
# ---------------------------------------------------------------------------------------------


def test_mlp_gate_shapes_and_initial_scores_near_continue():
    g = PerIterationMLPGate()
    g.bind(D, 3)
    assert len(g.mlps) == 3
    for mlp in g.mlps:
        assert mlp[0].in_features == D and mlp[0].out_features == 4 * D and mlp[2].out_features == 1
        assert mlp[2].bias.item() == pytest.approx(2.0)
    h = hidden(4, 16)
    for i in range(3):
        d = g(h, i, all_active(4, 16), None, positions(4, 16))
        assert d.scores.shape == (4, 16)
        assert d.scores.mean().item() == pytest.approx(1 / (1 + math.exp(-2)), abs=0.03)
        assert bool((d.scores > 0.7).all()) and bool((d.scores < 0.97).all())
        assert bool(d.active.all())  # nothing halts at init
        assert d.scores.requires_grad


def test_mlp_gate_halts_exactly_below_tau_and_is_monotone():
    g = PerIterationMLPGate(tau=0.5)
    g.bind(D, 3)
    spread_scores(g)
    b, t = 4, 16
    h = hidden(b, t)
    active = torch.rand(b, t) > 0.3
    for i in range(3):
        d = g(h, i, active, None, positions(b, t))
        expected = active & (d.scores >= 0.5)
        assert torch.equal(d.active, expected)
        assert not bool((d.active & ~active).any()), "a halted token was re-activated"
        # the score threshold is actually in play: some active tokens fall on each side
        assert bool((active & (d.scores < 0.5)).any()) and bool((active & (d.scores >= 0.5)).any())
        # inactive tokens stay inactive even with a high score
        assert bool((~active & (d.scores >= 0.5)).any())


def test_mlp_gate_default_tau_is_paper_value():
    g = PerIterationMLPGate()
    g.bind(D, 1)
    assert g.tau == pytest.approx(1e-4)
    with torch.no_grad():
        g.mlps[0][2].weight.zero_()
        g.mlps[0][2].bias.fill_(math.log(1e-4 / (1 - 1e-4)) - 0.01)  # just below tau
    d = g(hidden(2, 5), 0, all_active(2, 5), None, positions(2, 5))
    assert not bool(d.active.any())
    with torch.no_grad():
        g.mlps[0][2].bias.fill_(math.log(1e-4 / (1 - 1e-4)) + 0.01)  # just above
    d = g(hidden(2, 5), 0, all_active(2, 5), None, positions(2, 5))
    assert bool(d.active.all())


def test_single_mlp_gate_shares_one_mlp_per_iteration_gate_does_not():
    single = SingleMLPGate()
    single.bind(D, 3)
    per = PerIterationMLPGate()
    per.bind(D, 3)
    assert not hasattr(single, "mlps") or len(getattr(single, "mlps", [])) == 0
    n_single = sum(p.numel() for p in single.parameters())
    n_per = sum(p.numel() for p in per.parameters())
    assert n_per == 3 * n_single
    h = hidden(2, 8)
    act = all_active(2, 8)
    s_single = [single(h, i, act, None, positions(2, 8)).scores for i in range(3)]
    s_per = [per(h, i, act, None, positions(2, 8)).scores for i in range(3)]
    assert torch.equal(s_single[0], s_single[1]) and torch.equal(s_single[0], s_single[2])
    assert not torch.allclose(s_per[0], s_per[1]) and not torch.allclose(s_per[1], s_per[2])


def test_gate_flops():
    g = PerIterationMLPGate(hidden_mult=4)
    assert g.extra_flops_per_token(D) == 2.0 * (D * 4 * D + 4 * D)
    assert AlwaysContinue().extra_flops_per_token(D) == 0.0
    assert AlwaysContinue.can_halt is False and PerIterationMLPGate.can_halt is True


def test_always_continue_keeps_mask():
    g = AlwaysContinue()
    g.bind(D, 3)
    active = torch.rand(2, 6) > 0.5
    d = g(hidden(2, 6), 0, active, None, positions(2, 6))
    assert d.scores is None and torch.equal(d.active, active)


# ---------------------------------------------------------------------------------------------
# 8. BottomKGate
# ---------------------------------------------------------------------------------------------


def _bottom_k(ratio=0.25, momentum=0.9):
    g = BottomKGate(ratio=ratio, momentum=momentum)
    g.bind(D, 3)
    spread_scores(g)
    return g


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
def test_bottom_k_training_halts_lowest_fraction_of_active(ratio):
    g = _bottom_k(ratio).train()
    b, t = 4, 16
    h = hidden(b, t)
    active = torch.rand(b, t) > 0.25
    for i in range(3):
        d = g(h, i, active, None, positions(b, t))
        n_active = int(active.sum())
        halted = active & ~d.active
        assert not bool((d.active & ~active).any())
        assert int(halted.sum()) == math.floor(ratio * n_active)
        # the halted ones are the lowest-scored of the active tokens
        kept = d.active
        assert d.scores[halted].max() < d.scores[kept].min()
        active = d.active


def test_bottom_k_records_thresholds_as_ema_of_cutoffs():
    g = _bottom_k(0.25, momentum=0.9).train()
    assert not bool(g.thresholds_seen.any())
    b, t = 4, 16
    act = all_active(b, t)
    h1, h2 = hidden(b, t), hidden(b, t)
    d1 = g(h1, 1, act, None, positions(b, t))
    cut1 = d1.scores[act & ~d1.active].max().item()  # the n_halt-th smallest score
    assert bool(g.thresholds_seen[1]) and not bool(g.thresholds_seen[0]) and not bool(g.thresholds_seen[2])
    assert g.thresholds[1].item() == pytest.approx(cut1, abs=1e-7)
    d2 = g(h2, 1, act, None, positions(b, t))
    cut2 = d2.scores[act & ~d2.active].max().item()
    assert g.thresholds[1].item() == pytest.approx(0.9 * cut1 + 0.1 * cut2, abs=1e-6)
    assert g.thresholds[0].item() == 0.0


def test_bottom_k_eval_uses_learned_threshold():
    g = _bottom_k(0.3).train()
    b, t = 4, 16
    for _ in range(3):
        for i in range(3):
            g(hidden(b, t), i, all_active(b, t), None, positions(b, t))
    g.eval()
    h = hidden(b, t)
    active = torch.rand(b, t) > 0.2
    for i in range(3):
        d = g(h, i, active, None, positions(b, t))
        assert torch.equal(d.active, active & (d.scores >= g.thresholds[i]))
        assert bool((active & ~d.active).any()) and bool(d.active.any())


def test_bottom_k_eval_decision_independent_of_other_rows():
    g = _bottom_k(0.3).train()
    for i in range(3):
        g(hidden(4, 16), i, all_active(4, 16), None, positions(4, 16))
    h_alone = hidden(1, 16)
    others = hidden(3, 16) * 3.0  # very different rows
    batch = torch.cat([h_alone, others])
    g.eval()
    for i in range(3):
        alone = g(h_alone, i, all_active(1, 16), None, positions(1, 16))
        inside = g(batch, i, all_active(4, 16), None, positions(4, 16))
        assert torch.equal(alone.active[0], inside.active[0])
        assert bool((~alone.active).any())
    # the training-time rank, by contrast, does depend on the rest of the batch
    g.train()
    alone = g(h_alone, 0, all_active(1, 16), None, positions(1, 16))
    inside = g(batch, 0, all_active(4, 16), None, positions(4, 16))
    assert not torch.equal(alone.active[0], inside.active[0])


def test_bottom_k_ratio_validation():
    with pytest.raises(ValueError):
        BottomKGate(ratio=1.0)
    with pytest.raises(ValueError):
        BottomKGate(ratio=-0.1)


def test_bottom_k_too_few_tokens_halts_nothing():
    g = _bottom_k(0.1).train()
    d = g(hidden(1, 5), 0, all_active(1, 5), None, positions(1, 5))
    assert bool(d.active.all())
    assert not bool(g.thresholds_seen[0])


# ---------------------------------------------------------------------------------------------
# 9. FixedRatioGate
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule,target",
    [("uniform", 2.5), ("uniform", 3.0), ("uniform", 3.7), ("uniform", 4.0)]
    + [("geometric", t) for t in (1.0, 1.5, 2.0, 2.5, 3.7, 4.0)],
)
def test_active_fractions_schedule(schedule, target):
    fr = active_fractions(schedule, 4, target)
    assert len(fr) == 4
    assert fr[0] == pytest.approx(1.0)
    assert sum(fr) == pytest.approx(target, abs=1e-6)
    assert all(0.0 <= f <= 1.0 for f in fr)
    assert all(fr[i + 1] <= fr[i] + 1e-12 for i in range(3))
    if schedule == "uniform":
        steps = [fr[i] - fr[i + 1] for i in range(3)]
        assert max(steps) - min(steps) < 1e-9
    elif 1.0 < target < 4.0:
        ratios = [fr[i + 1] / fr[i] for i in range(3)]
        assert max(ratios) - min(ratios) < 1e-9


@pytest.mark.parametrize("target", [1.0, 1.5, 2.0, 2.5, 3.0])
def test_uniform_schedule_below_its_reach_is_rejected_and_within_it_realised(target):
    """A linear schedule over N = 4 iterations starting at 1 reaches a mean depth of (N+1)/2 = 2.5
    at the least (below, its last fraction would be negative): lower targets are refused with the
    fix (the geometric schedule), reachable ones give fractions in [0, 1], non-increasing, that sum
    to the target."""
    if target < 2.5:
        with pytest.raises(ValueError, match="2.5 at the least.*geometric"):
            active_fractions("uniform", 4, target)
        return
    fr = active_fractions("uniform", 4, target)
    assert all(0.0 <= f <= 1.0 for f in fr) and fr == sorted(fr, reverse=True), fr
    assert sum(fr) == pytest.approx(target, abs=1e-6)


@pytest.mark.parametrize("target", [1.0, 1.5, 2.5, 3.0])
def test_fixed_ratio_gate_uniform_realises_its_target_or_rejects_it(target):
    """Through the gate: a FixedRatioGate refuses a uniform target below its reach when bound, and
    realises the mean depth of one it accepts."""
    g = FixedRatioGate(target_depth=target, schedule="uniform")
    if target < 2.5:
        with pytest.raises(ValueError, match="geometric"):
            g.bind(D, 3)
        return
    g.bind(D, 3)
    b, t = 64, 256
    tokens, pos, active = torch.randint(0, 50304, (b, t)), positions(b, t), all_active(b, t)
    depth = active.long()
    for i in range(3):
        active = g(None, i, active, tokens, pos).active
        depth += active.long()
    assert depth.float().mean().item() == pytest.approx(target, abs=0.03)


def test_active_fractions_validation():
    with pytest.raises(ValueError):
        active_fractions("uniform", 4, 4.5)
    with pytest.raises(ValueError):
        active_fractions("uniform", 4, 0.5)
    with pytest.raises(ValueError):
        active_fractions("cosine", 4, 2.0)


@pytest.mark.parametrize("schedule", ["uniform", "geometric"])
@pytest.mark.parametrize("target", [2.6, 3.7])
def test_fixed_ratio_gate_realises_schedule(schedule, target):
    n = 4
    g = FixedRatioGate(target_depth=target, schedule=schedule, seed=3)
    g.bind(D, n - 1)
    b, t = 64, 256
    tokens = torch.randint(0, 50304, (b, t))
    pos = positions(b, t)
    active = all_active(b, t)
    masks = [active]
    for i in range(n - 1):
        d = g(None, i, active, tokens, pos)
        assert d.scores is None
        assert not bool((d.active & ~active).any())
        active = d.active
        masks.append(active)
    realised = [m.float().mean().item() for m in masks]
    expected = active_fractions(schedule, n, target)
    for r, e in zip(realised, expected, strict=True):
        assert r == pytest.approx(e, abs=0.02), (realised, expected)
    mean_depth = torch.stack(masks).sum(0).float().mean().item()
    assert mean_depth == pytest.approx(target, abs=0.03)


def test_fixed_ratio_gate_deterministic_and_local():
    g = FixedRatioGate(target_depth=2.5, seed=0)
    g.bind(D, 3)
    b, t = 4, 64
    tokens = torch.randint(0, 1000, (b, t))
    pos = positions(b, t)
    act = all_active(b, t)
    first = [g(None, i, act, tokens, pos).active for i in range(3)]
    again = [g(None, i, act, tokens.clone(), pos.clone()).active for i in range(3)]
    for a, c in zip(first, again, strict=True):
        assert torch.equal(a, c)
    # change every other token and row: row 0's unchanged (token, position) pairs keep their draws
    tokens2 = tokens.clone()
    tokens2[1:] = torch.randint(0, 1000, (b - 1, t))
    tokens2[0, 1::2] = torch.randint(0, 1000, (t // 2,))
    for i in range(3):
        d2 = g(None, i, act, tokens2, pos).active
        assert torch.equal(d2[0, 0::2], first[i][0, 0::2])
    # same id at the same position in different rows -> same draw; h is ignored
    same = tokens.clone()
    same[2] = same[0]
    for i in range(3):
        d = g(torch.randn(b, t, D), i, act, same, pos).active
        assert torch.equal(d[2], d[0])
    # the draw does depend on the position and on the iteration
    u = token_uniform(torch.full((1, t), 7), pos[:1], 0, 0)
    assert len(torch.unique(u)) == t
    assert not torch.equal(token_uniform(tokens, pos, 0, 0), token_uniform(tokens, pos, 1, 0))
    assert not torch.equal(token_uniform(tokens, pos, 0, 0), token_uniform(tokens, pos, 0, 1))


def test_token_uniform_range_and_uniformity():
    tokens = torch.randint(0, 50304, (64, 256))
    u = token_uniform(tokens, positions(64, 256), 2, 5)
    assert bool((u >= 0).all()) and bool((u < 1).all())
    hist = torch.histc(u, bins=10, min=0.0, max=1.0) / u.numel()
    assert bool(((hist - 0.1).abs() < 0.01).all()), hist
    # draws of successive iterations are uncorrelated
    v = token_uniform(tokens, positions(64, 256), 3, 5)
    corr = torch.corrcoef(torch.stack([u.flatten(), v.flatten()]))[0, 1]
    assert abs(corr.item()) < 0.03


# ---------------------------------------------------------------------------------------------
# 10. BottomKPonderLoss
# ---------------------------------------------------------------------------------------------


def test_ponder_loss_k_ramp():
    reg = BottomKPonderLoss(lam=0.1, k_max=0.2, start_step=100, ramp_steps=50)
    assert reg.k_at(0) == 0.0
    assert reg.k_at(99) == 0.0
    for step in range(100, 260, 7):
        k = reg.k_at(step)
        assert 0.0 <= k <= 0.2 + 1e-12
    assert reg.k_at(150) == pytest.approx(0.2)
    assert reg.k_at(10_000) == pytest.approx(0.2)
    # linear: equal increments per step inside the ramp
    incs = [reg.k_at(s + 1) - reg.k_at(s) for s in range(101, 140)]
    assert max(incs) - min(incs) < 1e-12 and incs[0] == pytest.approx(0.2 / 50)
    no_ramp = BottomKPonderLoss(lam=0.1, k_max=0.2, start_step=100, ramp_steps=0)
    assert no_ramp.k_at(99) == 0.0 and no_ramp.k_at(100) == 0.2
    assert [reg.k_at(s) for s in range(100, 152)] == sorted(reg.k_at(s) for s in range(100, 152))


def test_ponder_loss_k_ramp_endpoints_match_docstring():
    """Docstring / docs/method.md §4.3: k ramps 'from 0 at start_step to k_max at start_step + ramp_steps'."""
    reg = BottomKPonderLoss(lam=0.1, k_max=0.2, start_step=100, ramp_steps=50)
    assert reg.k_at(100) == pytest.approx(0.0)
    assert reg.k_at(125) == pytest.approx(0.1)
    assert reg.k_at(149) < 0.2


def test_ponder_loss_value_by_hand():
    reg = BottomKPonderLoss(lam=0.3, k_max=0.25, start_step=0, ramp_steps=1)
    torch.manual_seed(1)
    scores = [torch.rand(2, 8, requires_grad=True) for _ in range(3)]
    active = [torch.ones(2, 8, dtype=torch.bool), torch.rand(2, 8) > 0.3, torch.rand(2, 8) > 0.6]
    active[2] &= active[1]
    # inactive entries get the smallest scores: they must be ignored
    with torch.no_grad():
        for s, a in zip(scores, active, strict=True):
            s[~a] = -1.0
    loss = reg(scores, active, step=5)
    vals = sorted(v for s, a in zip(scores, active, strict=True) for v in s[a].tolist())
    k = int(0.25 * len(vals))
    assert k > 0
    expected = 0.3 * sum(vals[:k]) / k
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert all(v >= 0 for v in vals[:k])
    loss.backward()
    # gradient only on the k selected entries, lam / k each
    grads = torch.cat([s.grad[a] for s, a in zip(scores, active, strict=True)])
    assert int((grads != 0).sum()) == k
    assert grads[grads != 0].tolist() == pytest.approx([0.3 / k] * k)
    for s, a in zip(scores, active, strict=True):
        assert bool((s.grad[~a] == 0).all())


def test_ponder_loss_zero_before_start_keeps_graph():
    reg = BottomKPonderLoss(start_step=10)
    s = torch.rand(2, 4, requires_grad=True)
    loss = reg([s], [torch.ones(2, 4, dtype=torch.bool)], step=3)
    assert loss is not None and loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert bool((s.grad == 0).all())


def test_ponder_loss_none_without_scores():
    assert BottomKPonderLoss()([None, None], [torch.ones(1, 2, dtype=torch.bool)] * 2, step=5) is None
    assert NoPonderLoss()([torch.rand(1, 2)], [torch.ones(1, 2, dtype=torch.bool)], step=5) is None
