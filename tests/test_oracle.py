"""The oracle gate (`gates.OracleDepth`): each token halts after the passes it is known to need.
It must run exactly those passes in every execution form, and decoding under it must equal the
teacher-forced forward under it (KV reuse of halted tokens, the readout and the decoder's
bookkeeping right where a gate's saving would be made); `evaluate.label_study` reports it."""

from __future__ import annotations

import pytest
import torch
from decode_helpers import decode_rowwise

from ponder_lightning.data.synthetic import STEPS, PointerChase, label_block, passes_needed
from ponder_lightning.gates import FirstPassOnly, OracleDepth, ReadoutAtNeed
from ponder_lightning.generate import generate
from ponder_lightning.models import PonderLM

VOCAB = 128


@pytest.fixture
def model(single_thread):
    torch.manual_seed(0)
    return PonderLM(size="tiny", vocab_size=VOCAB).eval()  # 4 passes, no gate of its own


def oracle_for(model, needs: torch.Tensor) -> OracleDepth:
    oracle = OracleDepth(model.gate)
    oracle.needs = needs
    return oracle


def logits_under(model, ids: torch.Tensor, gate) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        hidden, trace = model.hidden_states(ids, gate=gate)
    return model.backbone.logits(hidden), trace.depth()


def test_each_token_runs_the_passes_it_needs_and_the_extremes_are_known_forms(model):
    ids = torch.randint(0, VOCAB, (3, 24))
    needs = torch.randint(1, 5, ids.shape)
    logits, depth = logits_under(model, ids, oracle_for(model, needs))
    assert torch.equal(depth, needs)
    full, full_depth = logits_under(model, ids, None)
    everyone = logits_under(model, ids, oracle_for(model, torch.full_like(ids, 4)))
    assert torch.equal(everyone[1], full_depth) and torch.allclose(everyone[0], full, atol=1e-5)
    first = logits_under(model, ids, FirstPassOnly(model.gate))[0]
    assert torch.allclose(logits_under(model, ids, oracle_for(model, torch.ones_like(ids)))[0], first, atol=1e-5)
    # Tokens that halted early change what their neighbours attend to at later passes.
    assert not torch.allclose(logits, full, atol=1e-3)


def test_prefill_and_rowwise_decoding_equal_the_teacher_forced_forward_under_the_oracle(model):
    ids = torch.randint(0, VOCAB, (1, 20))
    needs = torch.randint(1, 5, ids.shape)
    oracle = oracle_for(model, needs)
    forced, forced_depth = logits_under(model, ids, oracle)
    with model.with_gate(oracle):
        cache = model.new_cache(1, ids.shape[1])
        hidden, depth, _ = model.extend(ids, torch.ones_like(ids, dtype=torch.bool), cache)
        decoded, decoded_depth, _ = decode_rowwise(model, ids, prefill=6)
    assert torch.equal(depth, needs) and torch.allclose(model.backbone.logits(hidden), forced, atol=1e-5)
    assert torch.equal(decoded_depth, forced_depth[:, 6:])
    assert torch.allclose(decoded, forced[:, 6:], atol=1e-5)
    assert model.gate is oracle.base  # the model's own gate is back


def test_greedy_generation_under_the_oracle_is_what_the_forward_predicts(model):
    prompt = torch.randint(0, VOCAB, (9,)).tolist()
    needs = torch.randint(1, 5, (1, 9 + 8))
    oracle = oracle_for(model, needs)
    with model.with_gate(oracle):
        result = generate(model, [prompt], max_new_tokens=8)
    ids = torch.tensor([prompt + result.tokens[0]])
    logits, depth = logits_under(model, ids, oracle)
    assert result.tokens[0] == logits[0, 8:-1].argmax(-1).tolist()
    assert result.depths[0] == depth[0, 8:-1].tolist() == needs[0, 8:-1].tolist()


def test_the_oracle_refuses_rows_it_has_no_needs_for(model):
    ids = torch.randint(0, VOCAB, (2, 8))
    with pytest.raises(ValueError, match="one sequence at a time"):
        logits_under(model, ids, oracle_for(model, torch.ones(1, 8, dtype=torch.long)))


def test_label_study_runs_the_oracle_at_each_labels_steps(model):
    from ponder_lightning.evaluate import label_study

    docs = list(PointerChase(symbols=6, queries=10, n_docs=6, seed=2).documents_text())
    rows = [[256 % VOCAB, *map(ord, doc)] for doc in docs]
    batch = torch.tensor([row[: min(map(len, rows))] for row in rows])
    study = label_study(model, [batch], context=batch.shape[1] - 1)
    oracle, trained = study["oracle_depth"], study["as_trained"]
    assert oracle["labels"]["format"]["depth_mean"] == oracle["labels"]["aleatoric"]["depth_mean"] == 1.0
    for k in (1, 2, 3, 4):
        assert oracle["labels"][f"k={k}"]["depth_mean"] == k
    assert trained["depth_mean"] == 4.0 and oracle["flops_x_vanilla"] < trained["flops_x_vanilla"]
    assert oracle["auroc_depth_multi_step"] == 1.0
    labels = torch.tensor([label_block(row)[1:] for row in batch.tolist()])
    assert torch.equal(passes_needed(labels)[labels == STEPS + 3], torch.full_like(labels[labels == STEPS + 3], 3))


def test_reading_at_the_needed_pass_runs_full_depth_and_reads_each_tokens_pass(model):
    ids = torch.randint(0, VOCAB, (2, 16))
    needs = torch.randint(1, 5, ids.shape)
    control = ReadoutAtNeed(model.gate)
    control.needs = needs
    with torch.no_grad():
        hidden, trace = model.hidden_states(ids, gate=control)
        picked = model.backbone.logits(control.pick(hidden))
    assert torch.equal(trace.depth(), torch.full_like(ids, 4))  # nothing halts: full depth's K/V and FLOPs
    full = logits_under(model, ids, None)[0]
    first = logits_under(model, ids, FirstPassOnly(model.gate))[0]
    assert torch.allclose(picked[needs == 4], full[needs == 4], atol=1e-5)
    assert torch.allclose(picked[needs == 1], first[needs == 1], atol=1e-5)
    # a token read at its second pass sees every other token's second-pass K/V, unlike the oracle
    for k in (2, 3):
        everyone_at_k = logits_under(model, ids, oracle_for(model, torch.full_like(ids, k)))[0]
        assert torch.allclose(picked[needs == k], everyone_at_k[needs == k], atol=1e-5)
