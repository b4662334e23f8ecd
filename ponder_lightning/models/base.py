"""`CausalLMModule`: what every model shares — backbone construction, the recurrence, next-token
loss, metrics, optimiser and schedule, FLOPs and depth logging.

Every model is the shared recurrence (`nn/recurrence.py`) with parts plugged in; the vanilla model
is its one-iteration case. Subclasses override `n_iterations`, `embed_scale`, `build_feedback`
and, for learned halting, the gate and an auxiliary loss.
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from ponder_lightning import flops
from ponder_lightning.errors import UserError
from ponder_lightning.gates import AlwaysContinue, Gate
from ponder_lightning.nn import Backbone, BackboneConfig, backbone_config, pad_vocab
from ponder_lightning.nn.hf import load_pretrained
from ponder_lightning.models.metrics import DepthNLL
from ponder_lightning.nn.cache import KVCache
from ponder_lightning.nn.loss import IGNORE_INDEX, linear_cross_entropy
from ponder_lightning.nn.recurrence import Feedback, Recurrence, Trace
from ponder_lightning.nn.rowwise import RecurrenceRowDecoder
from ponder_lightning.resume import apply_optimizer_changes
from ponder_lightning.validation import (
    ClosedUnitInterval,
    HalfOpenUnitInterval,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    check_init_args,
)

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
    # A target counts only if it is real and so is the input predicting it (left padding's last
    # pad position would otherwise "predict" the first real token).
    targets = targets.masked_fill(~(valid[:, 1:] & valid[:, :-1]), IGNORE_INDEX)
    return inputs, targets, valid[:, :-1]


class CausalLMModule(L.LightningModule):
    """Base LightningModule for Pythia-style causal LMs.

    Args:
        size: backbone preset (`tiny`, `pythia-14m` ... `pythia-2.8b`, `llama-tiny` ... `llama-2.8b`).
        vocab_size: model vocabulary; default = the tokenizer's, padded to a multiple of 128.
        tokenizer_vocab_size: set by the CLI from the DataModule's tokenizer; checked against vocab_size.
        n_layer, d_model, n_head, max_seq_len: optional overrides of the preset.
        lr: peak learning rate (paper: 1e-3 at 70m, 6e-4 at 160m, 3e-4 at 410m).
        min_lr_ratio: cosine decay ends at this fraction of the peak (paper: 0.1).
        warmup_fraction: fraction of the total steps spent in linear warmup (paper: 0.01).
        weight_decay: AdamW decay on matrices and embeddings, never on biases and norms.
        betas: AdamW betas (paper: 0.9, 0.95).
        activation_checkpointing: recompute each layer in the backward pass to save memory.
        pretrained: local directory whose weights replace the initial backbone: a Hugging Face
            GPT-NeoX/LLaMA checkpoint (e.g. a Pythia download), a `--format transformers` export
            of this library (a model of the same class also takes its gates), or the PonderLM
            authors' GPT-NeoX directory; its shape and vocabulary must match the configured model.
    """

    def __init__(
        self,
        size: str = "pythia-14m",
        vocab_size: PositiveInt | None = None,
        tokenizer_vocab_size: PositiveInt | None = None,
        n_layer: PositiveInt | None = None,
        d_model: PositiveInt | None = None,
        n_head: PositiveInt | None = None,
        max_seq_len: PositiveInt | None = None,
        lr: PositiveFloat = 1e-3,
        min_lr_ratio: ClosedUnitInterval = 0.1,
        warmup_fraction: ClosedUnitInterval = 0.01,
        weight_decay: NonNegativeFloat = 0.01,
        betas: tuple[HalfOpenUnitInterval, HalfOpenUnitInterval] = (0.9, 0.95),
        activation_checkpointing: bool = False,
        pretrained: str | None = None,
    ) -> None:
        check_init_args(CausalLMModule, locals())
        super().__init__()
        with warnings.catch_warnings():
            # Gates are nn.Modules passed as arguments: the CLI stores their class path and init
            # args (not the module), and their weights live in the state dict, as intended.
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters()
        vocab = vocab_size or pad_vocab(tokenizer_vocab_size or NEOX_TOKENIZER_VOCAB)
        if tokenizer_vocab_size is not None and tokenizer_vocab_size > vocab:
            raise UserError(
                f"the tokenizer has {tokenizer_vocab_size} tokens but model vocab_size={vocab}: raise "
                f"model.init_args.vocab_size to at least {pad_vocab(tokenizer_vocab_size)} or use a smaller tokenizer"
            )
        self.config: BackboneConfig = backbone_config(
            size, vocab_size=vocab, n_layer=n_layer, d_model=d_model, n_head=n_head, max_seq_len=max_seq_len
        )
        self.backbone = Backbone(self.config)
        self.backbone.init_weights(passes_per_token=self.n_iterations)
        self.backbone.activation_checkpointing = activation_checkpointing
        if pretrained is not None:
            from ponder_lightning.hf_export import pretrained_backbone_state

            load_pretrained(self.backbone, pretrained, pretrained_backbone_state(pretrained))
        self.gate: Gate = AlwaysContinue()
        self.eval_metric = DepthNLL(max_depth=self.n_iterations)
        self.flops_per_batch: float | None = None
        self.last_trace: Trace | None = None

    # -- what subclasses plug in ---------------------------------------------------------------
    @property
    def n_iterations(self) -> int:
        """Backbone passes per token at full depth (also scales the output-projection init)."""
        return 1

    @property
    def embed_scale(self) -> float:
        return 1.0

    def build_feedback(self) -> Feedback:
        return Feedback()

    def aux_loss(self, trace: Trace) -> Tensor | None:
        """Extra training loss from the recurrence (e.g. AdaPonderLM's ponder loss)."""
        return None

    # -- the model -----------------------------------------------------------------------------
    @property
    def recurrence(self) -> Recurrence:
        # Built lazily: subclasses finish setting up the gate after this base __init__ returns.
        if getattr(self, "_recurrence", None) is None:
            self._recurrence = Recurrence(self.backbone, self.build_feedback(), self.gate, self.n_iterations, self.embed_scale)
        return self._recurrence

    def effective_gate(self) -> Gate:
        """The gate in force now (a model may bypass its gate early in training)."""
        return self.gate

    def hidden_states(self, inputs: Tensor, valid: Tensor | None = None, gate: Gate | None = None) -> tuple[Tensor, Trace]:
        """Final hidden states [B, T, d] (after the final norm) and the halting trace; `gate`
        replaces the gate in force for this call (evaluation's counterfactuals)."""
        return self.recurrence(inputs, valid, gate=self.effective_gate() if gate is None else gate)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """Empty decoding caches for `batch` sequences of up to `max_len` tokens."""
        cfg = self.config
        if max_len > cfg.max_seq_len:
            raise UserError(f"prompt + new tokens = {max_len} tokens exceed the model's context max_seq_len={cfg.max_seq_len}")
        weight = self.backbone.embed_in.weight
        return KVCache(self.n_iterations, cfg.n_layer, batch, cfg.n_head, cfg.head_dim, max_len, weight.dtype, weight.device)

    def extend(self, tokens: Tensor, valid: Tensor, cache: KVCache) -> tuple[Tensor, Tensor, list[int]]:
        """Run new tokens against the cache (prefill or one decode step): hidden states, depth per
        token and backbone token-evaluations per iteration (see `Recurrence.extend`)."""
        return self.recurrence.extend(tokens, valid, cache, gate=self.effective_gate())

    def row_decoder(self, cache: KVCache) -> RecurrenceRowDecoder:
        """Token-by-token decoding where each row moves through iterations at its own pace, on a
        cache prefilled by `extend` (see `nn/rowwise.py`)."""
        return RecurrenceRowDecoder(self.recurrence, cache, self.effective_gate())

    def forward(self, inputs: Tensor, valid: Tensor | None = None) -> Tensor:
        """Logits [B, T, V] for input tokens [B, T]."""
        return self.backbone.logits(self.hidden_states(inputs, valid)[0])

    def training_loss(self, batch: Tensor | dict[str, Tensor]) -> tuple[Tensor, Tensor, Trace]:
        """Mean next-token cross-entropy over non-padding targets (fused with the LM head),
        the number of such targets, and the trace."""
        inputs, targets, valid = split_batch(batch)
        hidden, trace = self.hidden_states(inputs, valid)
        loss = linear_cross_entropy(hidden.flatten(0, 1), self.backbone.embed_out.weight, targets.flatten())
        return loss, (targets != IGNORE_INDEX).sum(), trace

    # -- FLOPs -----------------------------------------------------------------------------
    def realised_flops(self, active_fractions: list[float], context: int) -> dict[str, float]:
        """Inference FLOPs per token (x vanilla) at the given per-iteration active fractions."""
        return flops.recurrent_forward_flops(
            self.config,
            context,
            active_fractions,
            self.recurrence.feedback.extra_flops_per_token(self.backbone),
            self.gate.extra_flops_per_token(self.config.d_model),
        )

    def full_depth_flops_per_token(self, context: int) -> float:
        """Forward FLOPs per token with every token running every iteration (what training does)."""
        return self.realised_flops([1.0] * self.n_iterations, context)["x_vanilla"] * flops.vanilla_forward_flops(self.config, context)

    # -- Lightning hooks -------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        seq_len = getattr(datamodule, "seq_len", None)
        if seq_len is None:
            return
        if seq_len > self.config.max_seq_len:
            raise UserError(
                f"data seq_len={seq_len} is longer than the model's context max_seq_len={self.config.max_seq_len}: "
                f"lower data.seq_len or raise model.init_args.max_seq_len"
            )
        rows = getattr(datamodule, "batch_size", 1) // max(self.trainer.world_size, 1)
        self.flops_per_batch = flops.training_flops(self.full_depth_flops_per_token(seq_len)) * seq_len * rows

    def training_step(self, batch: Tensor | dict[str, Tensor], batch_idx: int) -> Tensor:
        ce, n_tokens, trace = self.training_loss(batch)
        aux = self.aux_loss(trace)
        loss = ce if aux is None else ce + aux
        self._check_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        if aux is not None:
            self.log("train/ce", ce)
            self.log("train/aux_loss", aux)
        if self.n_iterations > 1:
            self._log_depth("train", trace, split_batch(batch)[0].shape[1])
            self._log_gate_health(trace)
        self.last_trace = Trace([a.detach() for a in trace.active], [None if s is None else s.detach() for s in trace.scores])
        return loss

    def _log_depth(self, stage: str, trace: Trace, context: int) -> None:
        fractions = trace.active_fractions()
        self.log(f"{stage}/depth_mean", fractions.sum())
        self.log(f"{stage}/halted_fraction", 1 - fractions.mean())
        for i, f in enumerate(fractions):
            self.log(f"{stage}/active_fraction/iter_{i}", f)
        for name, value in self.realised_flops(fractions.tolist(), context).items():
            self.log(f"{stage}/flops_{name}", value)

    def _log_gate_health(self, trace: Trace) -> None:
        """Hook for models with learned gates (see RecurrentLM)."""

    def token_nll(self, batch: Tensor | dict[str, Tensor], gate: Gate | None = None) -> tuple[Tensor, Tensor]:
        """NLL and depth of the counted (non-padding) target tokens of a batch, flat; `gate`
        replaces the gate in force (evaluation's counterfactuals)."""
        inputs, targets, valid = split_batch(batch)
        hidden, trace = self.hidden_states(inputs, valid) if gate is None else self.hidden_states(inputs, valid, gate=gate)
        logits = self.backbone.logits(hidden).float()
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        counted = targets.flatten() != IGNORE_INDEX
        return nll[counted], trace.depth().flatten()[counted]

    def validation_step(self, batch: Tensor | dict[str, Tensor], batch_idx: int) -> None:
        nll, depth = self.token_nll(batch)
        self.eval_metric.update(nll, depth)
        self._update_difficulty(batch, depth)

    def _update_difficulty(self, batch: Tensor | dict[str, Tensor], depth: Tensor) -> None:
        """Hook for models whose gates halt tokens (see RecurrentLM)."""

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def test_step(self, batch: Tensor | dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> None:
        result = self.eval_metric.compute()  # a torchmetrics Metric: already reduced over ranks
        log = partial(self.log, sync_dist=True)  # the same on every rank; says so to Lightning (no DDP warning)
        log(f"{stage}/loss", result["loss"], prog_bar=True)
        log(f"{stage}/ppl", torch.exp(result["loss"]))
        if self.n_iterations > 1:
            log(f"{stage}/depth_mean", result["depth_mean"])
            fractions = result["active_fractions"].reshape(-1).tolist()
            for i, f in enumerate(fractions):
                log(f"{stage}/active_fraction/iter_{i}", f)
            context = getattr(getattr(self.trainer, "datamodule", None), "seq_len", self.config.max_seq_len)
            log(f"{stage}/flops_x_vanilla", self.realised_flops(fractions, context)["x_vanilla"])
        self.depth_vs_nll = self.eval_metric.table()
        self.eval_metric.reset()
        self._log_difficulty(stage, log)

    def _log_difficulty(self, stage: str, log: Callable[..., None]) -> None:
        """Hook for models whose gates halt tokens (see RecurrentLM)."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run uses the configured lr, weight decay and betas, not the saved optimizer's."""
        apply_optimizer_changes(checkpoint, dict(self.hparams))

    def configure_model(self) -> None:
        """Under Lightning's ModelParallelStrategy, shard with FSDP2 (`parallel.shard_model`)."""
        if self.device_mesh is not None:
            from ponder_lightning.parallel import shard_model

            shard_model(self, self.device_mesh)

    def _check_finite(self, loss: Tensor) -> None:
        """Stop on a NaN/Inf loss. Every rank must stop together, or the others would hang in the
        next collective: the flag is reduced across ranks (min) before deciding."""
        finite = torch.isfinite(loss.detach()).float()
        if self._trainer is not None and self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        if not finite:
            from ponder_lightning.training import resume_hint

            raise UserError(
                f"training loss became {loss.item()} at step {self.global_step} (on at least one rank): "
                f"{resume_hint(self._trainer)} (or check the data)"
            )

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": hp.weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = max(int(hp.warmup_fraction * total), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `total` steps."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier
