"""`CausalLMModule`: what every model shares — backbone construction, next-token loss, metrics,
optimiser and schedule, and logging. Subclasses only say how hidden states are computed."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric

from ponder_lightning import flops
from ponder_lightning.errors import UserError
from ponder_lightning.nn import Backbone, BackboneConfig, backbone_config, causal_mask, pad_vocab, positions_from_valid
from ponder_lightning.nn.loss import IGNORE_INDEX, linear_cross_entropy

NEOX_TOKENIZER_VOCAB = 50277


def split_batch(batch: Tensor | dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
    """A batch is LongTensor[B, T+1] of packed tokens, or a dict with `input_ids` [B, T+1] and an
    optional `attention_mask` (1 = real token). Returns inputs, targets (padding -> ignore) and the
    validity mask of the inputs (None when nothing is padded)."""
    if isinstance(batch, dict):
        ids, valid = batch["input_ids"], batch.get("attention_mask")
    else:
        ids, valid = batch, None
    inputs, targets = ids[:, :-1], ids[:, 1:]
    if valid is None:
        return inputs, targets, None
    valid = valid.bool()
    targets = targets.masked_fill(~valid[:, 1:], IGNORE_INDEX)
    return inputs, targets, valid[:, :-1]


class CausalLMModule(L.LightningModule):
    """Base LightningModule for Pythia-style causal LMs.

    Args:
        size: backbone preset (`tiny`, `pythia-14m` ... `pythia-2.8b`).
        vocab_size: model vocabulary; default = the tokenizer's, padded to a multiple of 128.
        tokenizer_vocab_size: set by the CLI from the DataModule's tokenizer; checked against vocab_size.
        n_layer, d_model, n_head, max_seq_len: optional overrides of the preset.
        lr: peak learning rate (paper: 1e-3 at 70m, 6e-4 at 160m, 3e-4 at 410m).
        min_lr_ratio: cosine decay ends at this fraction of the peak (paper: 0.1).
        warmup_fraction: fraction of the total steps spent in linear warmup (paper: 0.01).
        weight_decay: AdamW decay on matrices and embeddings, never on biases and norms.
        betas: AdamW betas (paper: 0.9, 0.95).
    """

    def __init__(
        self,
        size: str = "pythia-14m",
        vocab_size: int | None = None,
        tokenizer_vocab_size: int | None = None,
        n_layer: int | None = None,
        d_model: int | None = None,
        n_head: int | None = None,
        max_seq_len: int | None = None,
        lr: float = 1e-3,
        min_lr_ratio: float = 0.1,
        warmup_fraction: float = 0.01,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        tokens = tokenizer_vocab_size or NEOX_TOKENIZER_VOCAB
        vocab = vocab_size or pad_vocab(tokens)
        if tokens > vocab:
            raise UserError(
                f"the tokenizer has {tokens} tokens but model vocab_size={vocab}: raise model.init_args.vocab_size "
                f"to at least {pad_vocab(tokens)} or use a smaller tokenizer"
            )
        self.config: BackboneConfig = backbone_config(
            size, vocab_size=vocab, n_layer=n_layer, d_model=d_model, n_head=n_head, max_seq_len=max_seq_len
        )
        self.backbone = Backbone(self.config)
        self.backbone.init_weights(passes_per_token=self.passes_per_token)
        # Token-weighted mean of the loss we already computed: exp() of it is exactly the perplexity,
        # without a second softmax over the vocabulary (torchmetrics.Perplexity would redo it).
        self.val_loss = MeanMetric()
        self.flops_per_batch: float | None = None

    # -- what subclasses define ----------------------------------------------------------------
    @property
    def passes_per_token(self) -> int:
        """How many times the layer stack runs per token (scales the output-projection init)."""
        return 1

    def hidden_states(self, inputs: Tensor, valid: Tensor | None) -> Tensor:
        """Final hidden states [B, T, d] (after the final norm) for input tokens [B, T]."""
        x = self.backbone.embed_in(inputs)
        if valid is None:
            return self.backbone(x)
        return self.backbone(x, positions=positions_from_valid(valid), mask=causal_mask(valid))

    def forward_flops_per_token(self, context: int) -> float:
        """FLOPs of one inference forward per token (the x-vanilla numerator)."""
        return flops.vanilla_forward_flops(self.config, context)

    # -- shared behaviour ----------------------------------------------------------------------
    def forward(self, inputs: Tensor, valid: Tensor | None = None) -> Tensor:
        """Logits [B, T, V] for input tokens [B, T]."""
        return self.backbone.logits(self.hidden_states(inputs, valid))

    def loss(self, batch: Tensor | dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Mean next-token cross-entropy over non-padding targets, and the number of such targets."""
        inputs, targets, valid = split_batch(batch)
        hidden = self.hidden_states(inputs, valid)
        loss = linear_cross_entropy(hidden.flatten(0, 1), self.backbone.embed_out.weight, targets.flatten())
        return loss, (targets != IGNORE_INDEX).sum()

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        seq_len = getattr(datamodule, "seq_len", None)
        if seq_len is not None and seq_len > self.config.max_seq_len:
            raise UserError(
                f"data seq_len={seq_len} is longer than the model's context max_seq_len={self.config.max_seq_len}: "
                f"lower data.init_args.seq_len or raise model.init_args.max_seq_len"
            )
        if seq_len is not None:
            batch = getattr(datamodule, "batch_size", 1) // max(self.trainer.world_size, 1)
            self.flops_per_batch = flops.training_flops(self.forward_flops_per_token(seq_len)) * seq_len * batch

    def training_step(self, batch: Tensor | dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, n_tokens = self.loss(batch)
        self._check_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: Tensor | dict[str, Tensor], batch_idx: int) -> None:
        loss, n_tokens = self.loss(batch)
        self.val_loss.update(loss, weight=n_tokens)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(loss), sync_dist=False)

    def test_step(self, batch: Tensor | dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("test/loss", loss)
        self.log("test/ppl", torch.exp(loss))

    def _check_finite(self, loss: Tensor) -> None:
        if not torch.isfinite(loss):
            raise UserError(
                f"training loss became {loss.item()} at step {self.global_step}: lower model.init_args.lr or check the data; "
                f"the last checkpoint before this step is intact"
            )

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = max(int(hp.warmup_fraction * total), 1)
        schedule = warmup_cosine(warmup, total, hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `total` steps."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier
