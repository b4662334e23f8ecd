"""The token-recurrent family: `TokenRecurrentLM` runs the shared recurrence (`nn/recurrence.py`)
with a feedback rule and a gate; the vanilla model is its one-iteration case. `RecurrentLM` adds
what PonderLM, LoopTransformer and AdaPonderLM share: a pluggable gate, a pluggable compute
regulariser, embedding scaling and a gate-only stage."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from ponder_lightning import flops
from ponder_lightning.gates import AlwaysContinue, Gate, NoPonderLoss, PonderRegularizer
from ponder_lightning.io.formats import pretrained_extra_state
from ponder_lightning.models.base import CausalLMModule
from ponder_lightning.nn.cache import KVCache
from ponder_lightning.nn.recurrence import Feedback, Recurrence, Trace
from ponder_lightning.nn.rowwise import RecurrenceRowDecoder
from ponder_lightning.training import require_trainable_gates
from ponder_lightning.upstream import attached_trainer
from ponder_lightning.validation import NonNegativeInt, PositiveFloat, PositiveInt, check_init_args

ALWAYS_CONTINUE = AlwaysContinue()


class TokenRecurrentLM(CausalLMModule):
    """A model that is the token recurrence: `n_iterations` passes with `feedback` between them
    and `self.gate` deciding which tokens go on (AlwaysContinue here; `RecurrentLM` plugs gates)."""

    def __init__(self, *, n_iterations: PositiveInt = 1, feedback: Feedback | None = None, **kwargs: Any) -> None:
        super().__init__(n_iterations=n_iterations, **kwargs)
        self.gate: Gate = AlwaysContinue()
        self.recurrence = Recurrence(self.backbone, Feedback() if feedback is None else feedback, n_iterations)

    def effective_gate(self) -> Gate:
        """The gate in force now (a model may bypass its gate early in training)."""
        return self.gate

    @contextmanager
    def with_gate(self, gate: Gate) -> Iterator[None]:
        """Run every form (training forward, prefill, decoding) with `gate` in place of the
        model's own, which is back on exit: a counterfactual (`gates.controls`) in `generate`,
        where no gate argument reaches the decoder. The model's own gate is not changed."""
        own = self.gate
        self.gate = gate
        try:
            yield
        finally:
            self.gate = own

    def hidden_states(
        self, inputs: Tensor, valid: Tensor | None = None, gate: Gate | None = None
    ) -> tuple[Tensor, Trace]:
        return self.recurrence(inputs, valid, self.effective_gate() if gate is None else gate)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        self.check_context(max_len)
        return KVCache(self.backbone, self.n_iterations, batch, max_len)

    def extend(self, tokens: Tensor, valid: Tensor, cache: KVCache) -> tuple[Tensor, Tensor, list[int]]:
        """Prefill at adaptive depth (see `Recurrence.extend`)."""
        return self.recurrence.extend(tokens, valid, cache, self.effective_gate())

    def row_decoder(self, cache: KVCache) -> RecurrenceRowDecoder:
        return RecurrenceRowDecoder(self.recurrence, cache, self.effective_gate())

    def realised_flops(self, active_fractions: list[float], context: int, gate: Gate | None = None) -> dict[str, float]:
        """`gate`: the gate whose cost to count (default: the gate in force, none before a
        gated model's `gate_start_step`)."""
        return flops.recurrent_forward_flops(
            self.config,
            context,
            active_fractions,
            self.recurrence.feedback.extra_flops_per_token(self.backbone),
            (self.effective_gate() if gate is None else gate).extra_flops_per_token(self.config.d_model),
        )

    def full_depth_flops_per_token(self, context: int) -> float:
        """Forward FLOPs per token with every token running every iteration (what training does)."""
        return self.realised_flops([1.0] * self.n_iterations, context)["x_vanilla"] * flops.vanilla_forward_flops(
            self.config, context
        )


class RecurrentLM(TokenRecurrentLM):
    """Args:
    gate: decides per token whether to run the next iteration (default: the model's own,
        AlwaysContinue for PonderLM/LoopTransformer, PerIterationMLPGate for AdaPonderLM).
    regularizer: loss on the gate scores (default: the model's own; NoPonderLoss = CE only).
    scale_embeds: multiply token embeddings by sqrt(d) (mixture feedback) or sqrt(2.5 d) (hidden
        feedback). Default (null): on from scratch; with `pretrained`, as those weights were
        trained (off for Pythia, whose first pass must then equal Pythia's logits; an export of
        this library keeps its own setting).
    train_only_gates: freeze everything but the gate (continued pretraining's first stage).
    gate_start_step: before this optimizer step the gate is bypassed (every token runs every
        iteration at full weight), so that the model learns to use its passes before gates may
        halt them; from scratch, gates met with an untrained mixture learn to skip it. 0 = gated
        from the start.
    embed_scale_factor: with `scale_embeds`, token embeddings are multiplied by
        sqrt(factor * d) (each model passes its own: 1 with mixture feedback, 2.5 with hidden
        feedback; not a setting).
    """

    def __init__(
        self,
        gate: Gate | None = None,
        regularizer: PonderRegularizer | None = None,
        scale_embeds: bool | None = None,
        train_only_gates: bool = False,
        gate_start_step: NonNegativeInt = 0,
        *,
        embed_scale_factor: PositiveFloat = 1.0,
        **kwargs: Any,
    ) -> None:
        check_init_args(RecurrentLM, locals())
        super().__init__(**kwargs)
        pretrained = self.hparams.get("pretrained")
        self.scale_embeddings(scale_embeds, embed_scale_factor)
        self.gate = gate if gate is not None else AlwaysContinue()
        self.gate.bind(self.config.d_model, self.n_iterations - 1)
        if pretrained is not None:
            self._load_pretrained_gates(pretrained)
        self.regularizer = regularizer if regularizer is not None else NoPonderLoss()
        if not isinstance(self.regularizer, NoPonderLoss) and not any(True for _ in self.gate.parameters()):
            rank_zero_warn(
                f"model.init_args.regularizer {type(self.regularizer).__name__} acts on gate scores, and the gate "
                f"{type(self.gate).__name__} has none: it does nothing here (set NoPonderLoss to say so)"
            )
        if train_only_gates:
            self.backbone.requires_grad_(False)
            require_trainable_gates(
                self, "model.init_args.train_only_gates=true", "use a learned gate or drop train_only_gates"
            )

    def _load_pretrained_gates(self, pretrained: str) -> None:
        """An export of this very class brings its gates too, when they are the same gates."""
        extra = pretrained_extra_state(pretrained, f"{type(self).__module__}.{type(self).__qualname__}")
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}
        if not extra:
            return
        if set(extra) != set(own) or any(extra[k].shape != own[k].shape for k in own):
            rank_zero_info(
                f"pretrained {pretrained}: backbone loaded; its gate weights do not fit this model's gate, "
                "which keeps its initialisation"
            )
            return
        self.load_state_dict(extra, strict=False)

    @property
    def gate_active(self) -> bool:
        # Without a trainer (a model loaded for generation), the step is the checkpoint's.
        step = self.global_step if attached_trainer(self) is not None else getattr(self, "checkpoint_step", 0)
        return step >= self.hparams.gate_start_step

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.checkpoint_step = checkpoint.get("global_step", 0)

    def effective_gate(self) -> Gate:
        return self.gate if self.gate_active else ALWAYS_CONTINUE

    def training_flops_x_vanilla(self, context: int, steps: int) -> float:
        """Full depth at every step (see the base class), with the gate's cost from
        `gate_start_step` on (before it, no gate runs)."""
        full = [1.0] * self.n_iterations
        gated = min(max(steps - self.hparams.gate_start_step, 0), steps)
        with_gate = self.realised_flops(full, context, self.gate)["x_vanilla"]
        without = self.realised_flops(full, context, ALWAYS_CONTINUE)["x_vanilla"]
        return (gated * with_gate + (steps - gated) * without) / max(steps, 1)

    def aux_loss(self, trace: Trace) -> Tensor | None:
        if not self.gate_active:
            return None
        return self.regularizer(trace.scores, trace.active[:-1], self.global_step, continuing=trace.active[1:])

    @property
    def measures_difficulty(self) -> bool:
        """True when the gate in force can halt tokens (there is a depth to set against a
        difficulty: `callbacks.DifficultyMonitor`)."""
        return self.n_iterations > 1 and self.gate_active and self.gate.can_halt
