"""`CausalLMModule`: what every model shares — backbone construction, next-token loss, validation
metrics, optimiser and schedule, FLOPs and depth logging.

Two families build on it: the token recurrence (`models/recurrent.py`: vanilla, PonderLM,
LoopTransformer, AdaPonderLM) and the latent slots (`models/ponder2.py`: PonderLM-2, PonderLM-3).
Each model states what it plugs in when it calls its parent's constructor (passes per token,
feedback, embedding scale, gate); a family provides the forward (`hidden_states`), decoding
(`new_cache`, `extend`, `row_decoder`) and FLOPs at a given depth (`realised_flops`).
"""

from __future__ import annotations

import math
import warnings
from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor

from ponder_lightning import flops
from ponder_lightning.errors import UserError
from ponder_lightning.io.compat import apply_optimizer_changes
from ponder_lightning.io.formats import pretrained_backbone_state, pretrained_scales_embeddings
from ponder_lightning.models.metrics import DepthNLL
from ponder_lightning.nn import Backbone, BackboneConfig, backbone_config, pad_vocab
from ponder_lightning.nn.backbone import softmax_dtype
from ponder_lightning.nn.cache import KVCache
from ponder_lightning.nn.gate import Gate
from ponder_lightning.nn.hf import load_pretrained
from ponder_lightning.nn.loss import IGNORE_INDEX, linear_cross_entropy
from ponder_lightning.nn.recurrence import Trace
from ponder_lightning.nn.rowwise import RowDecoder
from ponder_lightning.parallel import shard_model
from ponder_lightning.training import resume_hint
from ponder_lightning.upstream import attached_trainer
from ponder_lightning.validation import (
    ClosedUnitInterval,
    HalfOpenUnitInterval,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    check_init_args,
)

NEOX_TOKENIZER_VOCAB = 50277
#: Constructor arguments through which a model class states what it plugs into its parent; they
#: are code, not settings, so they are not saved as hyper-parameters (nor offered by the CLI).
MODEL_PARTS = ["n_iterations", "feedback", "embed_scale_factor"]


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


@dataclass
class DepthReport:
    """What the depth figure shows after a validation: (depth, tokens, mean NLL after its passes)
    per depth reached (`callbacks.DifficultyMonitor` adds depth per difficulty decile)."""

    table: list[tuple[int, int, float]]


class CausalLMModule(L.LightningModule, metaclass=ABCMeta):
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
        compile: compile each decoder layer for training steps (`torch.compile`, fullgraph, per
            block as torchtitan does, before FSDP2 sharding); validation and decoding stay eager.
            Pays on GPUs; on CPU measure first (benchmarks/compile_speed.py).
        pretrained: local directory whose weights replace the initial backbone: a Hugging Face
            GPT-NeoX/LLaMA checkpoint (e.g. a Pythia download), a `--format transformers` export
            of this library (a model of the same class also takes its gates), or the PonderLM
            authors' GPT-NeoX directory; its shape and vocabulary must match the configured model.
        n_iterations: backbone passes per token at full depth (each model passes its own; it is
            not a setting, and it scales the output-projection init).
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
        compile: bool = False,
        pretrained: str | None = None,
        *,
        n_iterations: PositiveInt = 1,
    ) -> None:
        check_init_args(CausalLMModule, locals())
        super().__init__()
        with warnings.catch_warnings():
            # Gates are nn.Modules passed as arguments: the CLI stores their class path and init
            # args (not the module), and their weights live in the state dict, as intended.
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters(ignore=MODEL_PARTS)
        self.n_iterations = n_iterations
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
        self.backbone.init_weights(passes_per_token=n_iterations)
        self.backbone.activation_checkpointing = activation_checkpointing
        if pretrained is not None:
            load_pretrained(self.backbone, pretrained, pretrained_backbone_state(pretrained))
        self.eval_metric = DepthNLL(max_depth=n_iterations)
        self.flops_per_batch: float | None = None
        self.gate: Gate | None = None  # what decides per token whether it goes on; None: PonderLM-2/3

    def scale_embeddings(self, scale_embeds: bool | None, factor: float) -> None:
        """Multiply token embeddings by sqrt(factor * d) if `scale_embeds`. None: on from scratch;
        with `pretrained`, as those weights were trained (off for Pythia, whose first pass then
        equals Pythia's logits). Resolved once and kept in the hyper-parameters, so checkpoints and
        exports keep it."""
        if scale_embeds is None:
            pretrained = self.hparams.get("pretrained")
            self.hparams.scale_embeds = pretrained is None or pretrained_scales_embeddings(pretrained)
        if self.hparams.scale_embeds:
            self.backbone.embed_scale = math.sqrt(factor * self.config.d_model)

    # -- what each family provides (the entry points call these; a model class that lacks one
    # cannot be built) ---------------------------------------------------------------------
    @abstractmethod
    def hidden_states(
        self, inputs: Tensor, valid: Tensor | None = None, gate: Gate | None = None
    ) -> tuple[Tensor, Trace]:
        """Final hidden states [B, T, d] (after the final norm) and the trace of what ran; `gate`
        replaces the gate in force for this call (evaluation's counterfactuals)."""

    def aux_loss(self, trace: Trace) -> Tensor | None:
        """Extra training loss from the forward (e.g. AdaPonderLM's ponder loss)."""
        return None

    @abstractmethod
    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """Empty decoding cache for `batch` sequences of up to `max_len` tokens."""

    @abstractmethod
    def extend(self, tokens: Tensor, valid: Tensor, cache: KVCache) -> tuple[Tensor, Tensor, list[int]]:
        """Run new tokens against the cache (prefill): hidden states, depth per token and backbone
        token-evaluations per iteration."""

    @abstractmethod
    def row_decoder(self, cache: KVCache) -> RowDecoder:
        """Token-by-token decoding where each row moves at its own pace, on a cache prefilled by
        `extend` (see `nn/rowwise.py`)."""

    @abstractmethod
    def realised_flops(self, active_fractions: list[float], context: int) -> dict[str, float]:
        """Inference FLOPs per token (x vanilla) at the given per-iteration active fractions."""

    @abstractmethod
    def full_depth_flops_per_token(self, context: int) -> float:
        """Forward FLOPs per token of a training step."""

    def training_flops_x_vanilla(self, context: int, steps: int) -> float:
        """Forward FLOPs per training token over a run's first `steps` optimizer steps, x vanilla:
        what the run cost, next to what it infers at. Training keeps its shapes static (every
        token runs every pass, halted ones masked), so this is set by the full depth, not by where
        a gate halts: halting saves inference compute only."""
        return self.full_depth_flops_per_token(context) / flops.vanilla_forward_flops(self.config, context)

    def check_seq_len(self, seq_len: int) -> None:
        """Training or validation blocks of `seq_len` tokens fit the model's context."""
        if seq_len > self.config.max_seq_len:
            raise UserError(
                f"data.seq_len={seq_len} is longer than the model's context max_seq_len={self.config.max_seq_len}: "
                "lower data.seq_len or raise model.init_args.max_seq_len"
            )

    def check_context(self, max_len: int) -> None:
        """A decoding cache of `max_len` positions (the prompt, and every new token but the last)."""
        if max_len > self.config.max_seq_len:
            raise UserError(
                f"the prompt and the new tokens fed back take {max_len} positions, beyond the model's context "
                f"max_seq_len={self.config.max_seq_len}: shorten the prompt or lower max_new_tokens"
            )

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

    # -- Lightning hooks -------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        seq_len = getattr(datamodule, "seq_len", None)
        if seq_len is None:
            return
        self.check_seq_len(seq_len)
        rows = getattr(datamodule, "batch_size", 1) // max(self.trainer.world_size, 1)
        self.flops_per_batch = flops.training_flops(self.full_depth_flops_per_token(seq_len)) * seq_len * rows

    def training_step(self, batch: Tensor | dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        """The loss, and the step's trace (detached) for callbacks (`on_train_batch_end` outputs)."""
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
        return {"loss": loss, "trace": trace.detach()}

    def _log_depth(self, stage: str, trace: Trace, context: int) -> None:
        fractions = trace.active_fractions()
        self.log(f"{stage}/depth_mean", fractions.sum())
        self.log(f"{stage}/halted_fraction", 1 - fractions.mean())
        for i, f in enumerate(fractions):
            self.log(f"{stage}/active_fraction/iter_{i}", f)
        for name, value in self.realised_flops(fractions.tolist(), context).items():
            self.log(f"{stage}/flops_{name}", value)

    def token_logprobs(self, hidden: Tensor) -> Tensor:
        """Log-probabilities [..., V] of the next token at `hidden` [..., d], in the softmax dtype:
        the one place hidden states become a distribution (evaluation, lm-eval, the depth map)."""
        logits = self.backbone.logits(hidden)
        return logits.to(softmax_dtype(logits.dtype)).log_softmax(-1)

    def token_nll(self, batch: Tensor | dict[str, Tensor], gate: Gate | None = None) -> tuple[Tensor, Tensor]:
        """NLL and depth of the counted (non-padding) target tokens of a batch, flat; `gate`
        replaces the gate in force (evaluation's counterfactuals)."""
        inputs, targets, valid = split_batch(batch)
        hidden, trace = self.hidden_states(inputs, valid, gate=gate)
        counted = targets != IGNORE_INDEX
        logprobs = self.token_logprobs(hidden[counted])
        nll = -logprobs.gather(-1, targets[counted].unsqueeze(-1)).squeeze(-1)
        return nll, trace.depth()[counted]

    def validation_step(self, batch: Tensor | dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Per-token NLL and depth of the batch's counted targets (also what the metric adds up)."""
        nll, depth = self.token_nll(batch)
        self.eval_metric.update(nll, depth)
        return {"nll": nll, "depth": depth}

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def test_step(self, batch: Tensor | dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def depth_report(self) -> DepthReport:
        """The depth figure's data for the validation now ending (callbacks call it from
        `on_validation_epoch_end`, which Lightning runs before the module's, and on every rank)."""
        return DepthReport(self.eval_metric.table())

    def _log_eval(self, stage: str) -> None:
        result = self.eval_metric.compute()  # a torchmetrics Metric: already reduced over ranks
        log = self.log_global
        log(f"{stage}/loss", result["loss"], prog_bar=True)
        log(f"{stage}/ppl", torch.exp(result["loss"]))
        if self.n_iterations > 1:
            log(f"{stage}/depth_mean", result["depth_mean"])
            fractions = result["active_fractions"].reshape(-1).tolist()
            for i, f in enumerate(fractions):
                log(f"{stage}/active_fraction/iter_{i}", f)
            context = getattr(getattr(self.trainer, "datamodule", None), "seq_len", self.config.max_seq_len)
            log(f"{stage}/flops_x_vanilla", self.realised_flops(fractions, context)["x_vanilla"])
        self.eval_metric.reset()

    def log_global(self, name: str, value: Any, **kwargs: Any) -> None:
        """Log a value that is the same on every rank (a synchronised metric): says so to
        Lightning, so DDP does not warn."""
        self.log(name, value, sync_dist=True, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run uses the configured lr, weight decay and betas, not the saved optimizer's."""
        apply_optimizer_changes(checkpoint, dict(self.hparams))

    def configure_model(self) -> None:
        """Compile the layers if asked; under Lightning's ModelParallelStrategy, then shard with
        FSDP2 (`parallel.shard_model`)."""
        if self.hparams.compile:
            self.backbone.compile_layers()
        if self.device_mesh is not None:
            shard_model(self, self.device_mesh)

    def _check_finite(self, loss: Tensor) -> None:
        """Stop on a NaN/Inf loss. Every rank must stop together, or the others would hang in the
        next collective: the flag is reduced across ranks (min) before deciding."""
        finite = torch.isfinite(loss.detach()).float()
        if attached_trainer(self) is not None and self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        if not finite:
            raise UserError(
                f"training loss became {loss.item()} at step {self.global_step} (on at least one rank): "
                f"{resume_hint(attached_trainer(self))} (or check the data)"
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
