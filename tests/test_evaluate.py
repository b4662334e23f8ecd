"""`evaluate`: perplexity with compute, consistent with the loss and with flops.py."""

import json
import math

import pytest
import torch
from halting import make_gates_halt

from ponder_lightning import flops
from ponder_lightning.evaluate import evaluate, write_curve
from ponder_lightning.models import AdaPonderLM, VanillaLM


def halting_model() -> AdaPonderLM:
    return make_gates_halt(AdaPonderLM(size="tiny", vocab_size=256))


def test_numbers_are_consistent(tmp_path):
    model = halting_model()
    batches = [torch.randint(0, 256, (2, 33)) for _ in range(3)]
    rows = evaluate(model, batches, context=32, taus=[1e-4, 1e-2, 0.3])
    with torch.no_grad():
        nll = [model.training_loss(b)[0] for b in batches]
    for row in rows:
        assert math.isclose(row["ppl"], math.exp(row["loss"]), rel_tol=1e-6)
        fractions = row["active_fractions"]
        assert math.isclose(row["depth_mean"], sum(fractions), rel_tol=1e-5)
        expected = flops.recurrent_forward_flops(
            model.config,
            32,
            fractions,
            model.recurrence.feedback.extra_flops_per_token(model.backbone),
            model.gate.extra_flops_per_token(model.config.d_model),
        )["x_vanilla"]
        assert math.isclose(row["flops_x_vanilla"], expected, rel_tol=1e-9)
        counted = sum(n for _, n, _ in row["depth_vs_nll"])
        assert counted == 3 * 2 * 32
    # Equal batch sizes: the token-weighted mean loss is the mean of the batch losses.
    model.gate.tau = 1e-4
    assert math.isclose(rows[0]["loss"], float(torch.stack(nll).mean()), rel_tol=1e-5)
    depths = [r["depth_mean"] for r in rows]
    assert depths[0] >= depths[1] >= depths[2] and depths[2] < depths[0], depths
    assert model.gate.tau == 1e-4  # restored after the sweep
    json_path, png_path = write_curve(rows, tmp_path)
    assert len(json.loads(json_path.read_text())) == 3 and png_path.stat().st_size > 1000


def test_vanilla_is_one_pass_at_one_vanilla():
    rows = evaluate(VanillaLM(size="tiny", vocab_size=256), [torch.randint(0, 256, (2, 17))], context=16)
    assert rows[0]["depth_mean"] == 1.0 and math.isclose(rows[0]["flops_x_vanilla"], 1.0)


def test_gate_study_controls_share_the_weights_and_match_the_profile():
    from ponder_lightning.evaluate import format_gate_study
    from ponder_lightning.research.gate_study import gate_study

    model = halting_model()
    model.gate.tau = 0.05
    batches = [torch.randint(0, 256, (4, 65)) for _ in range(3)]
    reference = VanillaLM(size="tiny", vocab_size=256)
    study = gate_study(model, batches, context=64, reference=reference)
    learned, full = study["rows"][:2]
    random_rows = [row for row in study["rows"] if row["kind"] == "random_pruning"]
    assert learned["depth_mean"] < 3.5, "the test needs a gate that halts"
    assert full["depth_mean"] == 4.0 and full["flops_x_vanilla"] > learned["flops_x_vanilla"]
    assert len(random_rows) == 2
    for row in random_rows:  # random pruning at the learned per-iteration profile: iso-FLOPs
        for got, want in zip(row["active_fractions"], learned["active_fractions"], strict=True):
            assert abs(got - want) < 0.06, (row["active_fractions"], learned["active_fractions"])
    assert random_rows[0]["loss"] != random_rows[1]["loss"]  # two seeds, two draws
    assert set(study["difficulty"]) == {
        "nll_full_depth",
        "nll_first_pass",
        "entropy_first_pass",
        "nll_reference",
        "pondering_gain",
    }
    ranked = [row for row in study["rows"] if row["kind"].startswith(("entropy_", "oracle_", "probe_"))]
    assert len(ranked) == 5
    for row in ranked:  # other choices of tokens at the learned profile: iso-FLOPs to one token
        for got, want in zip(row["active_fractions"], learned["active_fractions"], strict=True):
            assert abs(got - want) <= 1 / study["tokens"], (row["active_fractions"], learned["active_fractions"])
    for report in study["difficulty"].values():
        assert len(report["deciles"]) == 10 and -1 <= report["spearman"] <= 1
        assert [d["difficulty"] for d in report["deciles"]] == sorted(d["difficulty"] for d in report["deciles"])
    assert study["tokens"] == 3 * 4 * 64
    assert "random pruning, learned profile (seed 1)" in format_gate_study(study)


def test_ranking_tokens_by_their_learned_depth_reproduces_the_learned_gate():
    """`ranked_pruning` maps a flat per-token priority back onto each batch and cuts it at the
    learned profile: ranked by the depth the gate gave them, the same tokens halt at the same
    decisions, so NLL and depth equal the learned gate's (padding included)."""
    from ponder_lightning.evaluate import token_nll
    from ponder_lightning.research.controls import RankedPruning
    from ponder_lightning.research.gate_study import ranked_pruning

    model = halting_model()
    model.gate.tau = 0.05
    ids = torch.randint(0, 256, (3, 41))
    valid = torch.ones_like(ids)
    valid[0, :7] = 0  # left padding: those targets are not counted
    batches = [{"input_ids": ids, "attention_mask": valid}, torch.randint(0, 256, (2, 41))]
    nll, depth = token_nll(model, batches)
    assert len(depth.unique()) >= 3, "the test needs tokens that halt at different decisions"
    fractions = [float((depth > i).double().mean()) for i in range(model.n_iterations)]
    ranked_nll, ranked_depth = ranked_pruning(model, batches, model.gate, depth.double(), fractions)
    assert torch.equal(ranked_depth, depth)
    torch.testing.assert_close(ranked_nll, nll)
    # Ranked the other way round, other tokens halt.
    assert not torch.equal(ranked_pruning(model, batches, model.gate, -depth.double(), fractions)[1], depth)
    with pytest.raises(ValueError, match="cut-offs must be numbers"):
        RankedPruning(model.gate, [float("nan")])


def test_entropy_is_that_of_the_prediction():
    from ponder_lightning.evaluate import token_entropy

    model = VanillaLM(size="tiny", vocab_size=256).eval()
    batch = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        probs = model.backbone.logits(model.hidden_states(batch[:, :-1])[0]).double().softmax(-1)
    expected = -(probs * probs.log()).sum(-1).flatten()
    torch.testing.assert_close(token_entropy(model, [batch]).double(), expected, rtol=1e-4, atol=1e-4)


def test_the_gain_probe_is_cross_fitted_and_linear():
    """A token's predicted gain comes from a fit on the other half of the blocks only, and a gain
    that is linear in the gate's input is recovered."""
    from ponder_lightning.research.gate_study import probe_gain

    torch.manual_seed(0)
    batches = [torch.randint(0, 256, (2, 65)) for _ in range(4)]
    inputs = [torch.randn(2, 64, 8) for _ in batches]
    weights = torch.randn(8)
    gain = torch.cat([(h @ weights).flatten() for h in inputs]) + 0.5
    predicted = probe_gain(inputs, gain, batches)
    torch.testing.assert_close(predicted, gain.double(), rtol=0, atol=0.05)
    half = gain.numel() // 2
    shuffled = gain.clone()
    shuffled[half:] = shuffled[half:][torch.randperm(half)]  # the second half's targets change ...
    moved = probe_gain(inputs, shuffled, batches)
    torch.testing.assert_close(moved[half:], predicted[half:])  # ... its own predictions do not
    assert not torch.allclose(moved[:half], predicted[:half])  # the first half's, fitted on them, do
    assert probe_gain(inputs[:1], gain[: 2 * 64], batches[:1]) is None


def test_difficulty_monitor_is_opt_in_and_logs_the_full_depth_perplexity_evaluate_computes(tmp_path):
    """Without the callback validation runs one forward a batch and logs no difficulty; with it,
    `val/ppl_full_depth` is the perplexity `token_nll` gives at full depth on the same batches."""
    import lightning as L

    from ponder_lightning.callbacks import DifficultyMonitor
    from ponder_lightning.evaluate import token_nll
    from ponder_lightning.gates import FirstPassOnly, FullDepth

    model = halting_model().eval()
    batches = [torch.randint(0, 256, (2, 33)) for _ in range(3)]

    def validate(callbacks):
        trainer = L.Trainer(
            accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.validate(model, torch.utils.data.DataLoader(batches, batch_size=None), verbose=False)
        return trainer.callback_metrics

    assert "val/ppl_full_depth" not in validate([]) and "val/ppl" in validate([])
    metrics = validate([DifficultyMonitor()])
    full, _ = token_nll(model, batches, FullDepth(model.gate))
    first, _ = token_nll(model, batches, FirstPassOnly(model.gate))
    assert float(metrics["val/ppl_full_depth"]) == pytest.approx(float(full.double().mean().exp()), rel=1e-5)
    assert float(metrics["val/ppl_first_pass"]) == pytest.approx(float(first.double().mean().exp()), rel=1e-5)
    assert float(metrics["val/depth_mean"]) < model.n_iterations  # tokens halted: full depth is another run
    assert float(metrics["val/ppl_full_depth"]) != pytest.approx(float(metrics["val/ppl"]), rel=1e-6)
    assert "val/depth_spearman/nll_full_depth" in metrics
