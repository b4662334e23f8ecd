"""`research.callbacks.TrainAtOracleDepth`: training and validation run every token at the passes
its label needs, the loss and its gradients are those of the oracle's forward, and the model's
own gate is back (and is what the checkpoint holds) after each batch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from fit_helpers import tiny_fit
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ponder_lightning.cli import run_lightning_cli
from ponder_lightning.data.synthetic import PointerChase, passes_needed, target_labels
from ponder_lightning.errors import UserError
from ponder_lightning.gates import OracleDepth
from ponder_lightning.io.load import load_checkpoint
from ponder_lightning.models import PonderLM, VanillaLM
from ponder_lightning.nn.gate import AlwaysContinue
from ponder_lightning.research.callbacks import TrainAtOracleDepth

SPEC = "synthetic:pointer_chase:symbols=6,max_hops=2,queries=8,n_docs=400"
CALLBACK = "--trainer.callbacks+=ponder_lightning.research.callbacks.TrainAtOracleDepth"


def pointer_chase_block(length: int = 65) -> torch.Tensor:
    """One block of a pointer-chase stream in `bytes` ids (documents joined by EOS = 256)."""
    docs = PointerChase(symbols=6, max_hops=2, queries=8, n_docs=4, seed=0).documents_text()
    ids = [i for doc in docs for i in (256, *doc.encode())][:length]
    return torch.tensor([ids])


def test_the_training_loss_is_the_oracles_and_the_gate_is_back_after_the_batch(single_thread):
    torch.manual_seed(0)
    model = PonderLM(size="tiny", vocab_size=257, pondering_steps=1)
    batch = pointer_chase_block()
    needs = passes_needed(target_labels(batch)).clamp(max=2)
    assert needs.eq(2).any() and needs.eq(1).any()  # the block has 2-hop answers and tokens that need one pass
    own = model.gate
    oracle = OracleDepth(own)
    oracle.needs = needs
    with model.with_gate(oracle):
        expected, _, expected_trace = model.training_loss(batch)
    (expected_grad,) = torch.autograd.grad(expected, model.backbone.embed_in.weight)

    callback = TrainAtOracleDepth()
    callback.on_train_batch_start(None, model, batch, 0)
    loss, _, trace = model.training_loss(batch)
    callback.on_train_batch_end(None, model, {}, batch, 0)
    (grad,) = torch.autograd.grad(loss, model.backbone.embed_in.weight)
    assert torch.equal(trace.depth(), needs) and torch.equal(expected_trace.depth(), needs)
    assert torch.equal(loss, expected) and torch.equal(grad, expected_grad)
    assert model.gate is own
    full, _, _ = model.training_loss(batch)
    assert not torch.allclose(full, loss)  # outside the batch the model runs its own (full) depth


def test_fit_validates_at_the_oracles_depth_and_saves_the_models_own_gate(tmp_path, single_thread):
    run_lightning_cli(
        ["fit", *tiny_fit("ponderlm", seq_len=64, batch_size=4), "--model.init_args.pondering_steps", "1"]
        + ["--data.data_files", SPEC, "--data.cache_dir", str(tmp_path / "cache"), CALLBACK]
        + ["--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]
        + [
            "--trainer.limit_val_batches",
            "2",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.log_every_n_steps",
            "1",
        ]
        + ["--trainer.enable_progress_bar", "false"]
    )
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"))
    events.Reload()
    logged = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    assert logged["val/label_depth/format"] == 1.0 and logged["val/label_depth/k=1"] == 1.0
    assert logged["val/label_depth/k=2"] == 2.0
    assert logged["train/depth_mean"] < 2.0
    model, _ = load_checkpoint(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    assert type(model.gate) is AlwaysContinue


@pytest.mark.parametrize(
    ("model_class", "data_files", "culprit"),
    [(VanillaLM, SPEC, "token-recurrent model"), (PonderLM, None, "synthetic task")],
)
def test_it_refuses_what_it_cannot_halt_by(single_thread, model_class, data_files, culprit):
    trainer = SimpleNamespace(datamodule=SimpleNamespace(data_files=data_files))
    with pytest.raises(UserError, match=culprit):
        TrainAtOracleDepth().setup(trainer, model_class(size="tiny", vocab_size=257), "fit")
