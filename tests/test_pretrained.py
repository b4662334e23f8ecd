"""Continued pretraining from a transformers GPT-NeoX directory, the two-stage schedule, and the way
back: `load_checkpoint` for every model class and gate, and `export` to a Hugging Face directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fit_helpers import tiny_fit, trainer_overlay
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from ponder_lightning.cli import main
from ponder_lightning.errors import UserError
from ponder_lightning.io.export import export_hf
from ponder_lightning.io.formats import EXPORT_CONFIG
from ponder_lightning.io.load import load_checkpoint
from ponder_lightning.models import AdaPonderLM, VanillaLM
from ponder_lightning.training import GateOnlyStage

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 384  # the bytes tokenizer's 257 ids padded to a multiple of 128


def save_tiny_neox(path: Path, **overrides) -> GPTNeoXForCausalLM:
    """A random GPT-NeoX shaped like our `tiny` preset, saved by transformers itself."""
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=512,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        layer_norm_eps=1e-5,
        use_parallel_residual=True,
        hidden_act="gelu",
        tie_word_embeddings=False,
        **overrides,
    )
    torch.manual_seed(1)
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():  # random norms and biases too, so that no term is trivially zero
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm.weight" in name else 0.0, 0.2)
    model.save_pretrained(path)
    return model


def hf_logits(model: GPTNeoXForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_import_from_transformers_and_export_back_gives_identical_logits(tmp_path):
    original = save_tiny_neox(tmp_path / "pythia")
    ids = torch.randint(0, VOCAB, (2, 40))
    model = VanillaLM(size="tiny", tokenizer_vocab_size=257, pretrained=str(tmp_path / "pythia")).eval()
    with torch.no_grad():
        assert torch.allclose(model(ids), hf_logits(original, ids), atol=1e-5, rtol=0)
    export_hf(model, tmp_path / "exported", tokenizer="neox")
    assert not (tmp_path / "exported" / EXPORT_CONFIG).exists()  # vanilla = a plain GPT-NeoX checkpoint
    reloaded = GPTNeoXForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert torch.equal(hf_logits(reloaded, ids), hf_logits(original, ids))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "exported").eos_token == "<|endoftext|>"
    # A plain GPT-NeoX directory loads back as a VanillaLM.
    vanilla, _ = load_checkpoint(tmp_path / "exported")
    assert torch.allclose(vanilla(ids), hf_logits(original, ids), atol=1e-5, rtol=0)


def test_pretrained_must_match_the_model(tmp_path):
    save_tiny_neox(tmp_path / "pythia")
    with pytest.raises(UserError, match=r"vocab_size=384 but the model has 50304.*--data.tokenizer neox"):
        VanillaLM(size="tiny", pretrained=str(tmp_path / "pythia"))
    with pytest.raises(UserError, match=r"n_layer=2 \(model: 6\), d_model=64 \(model: 128\).*size=tiny"):
        AdaPonderLM(size="pythia-14m", vocab_size=VOCAB, pretrained=str(tmp_path / "pythia"))
    with pytest.raises(UserError, match="not a local directory"):
        VanillaLM(size="tiny", vocab_size=VOCAB, pretrained=str(tmp_path / "EleutherAI" / "pythia-70m"))
    # Scaled rotary embeddings (here in an older config's spelling) would give wrong logits.
    config = json.loads((tmp_path / "pythia" / "config.json").read_text())
    config.pop("rope_parameters", None)
    (tmp_path / "pythia" / "config.json").write_text(
        json.dumps(config | {"rope_scaling": {"type": "linear", "factor": 4.0}})
    )
    with pytest.raises(UserError, match="rope type 'linear'"):
        VanillaLM(size="tiny", vocab_size=VOCAB, pretrained=str(tmp_path / "pythia"))


def every_step_checkpoints() -> dict:
    return {
        "class_path": "ponder_lightning.training.AtomicModelCheckpoint",
        "init_args": {"save_top_k": -1, "every_n_train_steps": 1},
    }


def test_continue_pythia_config_trains_gates_then_everything_and_exports(tmp_path):
    save_tiny_neox(tmp_path / "pythia")
    pythia = {
        f"backbone.{k}": v
        for k, v in VanillaLM(size="tiny", vocab_size=VOCAB, pretrained=str(tmp_path / "pythia"))
        .backbone.state_dict()
        .items()
    }
    overlay = trainer_overlay(
        tmp_path / "o.yaml",
        4,
        [
            every_step_checkpoints(),
            {"class_path": "ponder_lightning.training.GateOnlyStage", "init_args": {"steps": 2}},
        ],
    )
    main(
        [
            "fit",
            *tiny_fit("continue_pythia_adaponderlm", batch_size=4),
            "--config",
            overlay,
            "--model.init_args.pretrained",
            str(tmp_path / "pythia"),
            "--model.init_args.lr",
            "3e-3",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    states = {
        s: torch.load(checkpoints / f"epoch=0-step={s}.ckpt", weights_only=False)["state_dict"] for s in (1, 2, 3)
    }
    for step in (1, 2):  # gate-only stage: the backbone is Pythia's, the gates moved
        assert all(torch.equal(states[step][k], v) for k, v in pythia.items())
    assert not torch.equal(states[1]["gate.mlps.0.0.weight"], states[2]["gate.mlps.0.0.weight"])
    assert not torch.equal(
        states[3]["backbone.layers.0.mlp.dense_h_to_4h.weight"], pythia["backbone.layers.0.mlp.dense_h_to_4h.weight"]
    )

    main(["export", "--checkpoint", str(checkpoints / "epoch=0-step=3.ckpt"), "--out", str(tmp_path / "exported")])
    model, data = load_checkpoint(checkpoints / "epoch=0-step=3.ckpt")
    exported, exported_data = load_checkpoint(tmp_path / "exported")
    assert type(exported) is AdaPonderLM and data["tokenizer"] == exported_data["tokenizer"] == "bytes"
    assert exported.hparams.get("pretrained") is None  # the weights come from the export, not the Pythia directory
    ids = torch.randint(0, 257, (2, 30))
    with torch.no_grad():
        assert torch.equal(exported(ids), model(ids))
    # transformers loads the backbone part of a pondering export as a plain GPT-NeoX.
    neox = GPTNeoXForCausalLM.from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        assert torch.allclose(
            hf_logits(neox, ids), model.backbone.logits(model.backbone(model.backbone.embed_in(ids))), atol=1e-5
        )


def test_gate_only_stage_needs_a_learned_gate():
    from types import SimpleNamespace

    from ponder_lightning.models import PonderLM

    with pytest.raises(UserError, match="no trainable parameters outside the backbone"):
        GateOnlyStage(5).setup(SimpleNamespace(), PonderLM(size="tiny", vocab_size=VOCAB), "fit")
    with pytest.raises(UserError, match="train_only_gates"):
        GateOnlyStage(5).setup(
            SimpleNamespace(), AdaPonderLM(size="tiny", vocab_size=VOCAB, train_only_gates=True), "fit"
        )


@pytest.mark.parametrize(
    "config, overlays",
    [
        ("vanilla", []),
        ("ponderlm", []),
        ("loop", ["gates/bottom_k.yaml"]),
        ("adaponderlm", []),
        ("adaponderlm", ["gates/single_mlp.yaml"]),
        ("adaponderlm", ["gates/fixed_uniform.yaml"]),
    ],
)
def test_load_checkpoint_and_export_every_model_and_gate(tmp_path, config, overlays):
    extra = [a for o in overlays for a in ("--config", str(ROOT / "configs" / o))]
    overlay = trainer_overlay(tmp_path / "o.yaml", 2, [every_step_checkpoints()])
    main(
        [
            "fit",
            *tiny_fit(config, batch_size=4),
            *extra,
            "--config",
            overlay,
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "epoch=0-step=2.ckpt"
    model, data = load_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert type(model).__name__ == saved["hyper_parameters"]["_class_path"].rsplit(".", 1)[1]
    assert data["tokenizer"] == "bytes" and data["global_step"] == 2 and not model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved["state_dict"].items())
    export_hf(model, tmp_path / "exported", data["tokenizer"], data["global_step"])
    again, _ = load_checkpoint(tmp_path / "exported")
    assert type(again) is type(model) and type(again.gate) is type(model.gate)
    ids = torch.randint(0, 257, (2, 24))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
