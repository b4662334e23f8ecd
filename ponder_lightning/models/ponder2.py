"""PonderLM-2: before predicting each next token the model emits K latent thoughts, its own last
hidden states fed back as extra input slots right after the token (`nn/latent.py`)."""

from __future__ import annotations

import math
import random
from typing import Any

from torch import Tensor

from ponder_lightning import flops
from ponder_lightning.errors import UserError
from ponder_lightning.models.base import CausalLMModule
from ponder_lightning.nn.latent import LatentCache, LatentRecurrence, LatentRowDecoder
from ponder_lightning.nn.recurrence import Trace
from ponder_lightning.validation import NonNegativeInt, PositiveInt, check_init_args


class PonderLM2(CausalLMModule):
    """Args:
    latent_steps: K latent slots per token (paper default 1; inference costs (K+1)x vanilla).
    jacobi_choices: the Jacobi passes J of each training step, drawn uniformly (paper: 2 or 3).
    jacobi_eval: J at validation and test (paper: 3). Decoding is exact and uses no J.
    scale_embeds: token embeddings x sqrt(2.5 d) (latents are raw final-norm hidden states).
    """

    def __init__(
        self,
        latent_steps: PositiveInt = 1,
        jacobi_choices: tuple[NonNegativeInt, ...] = (2, 3),
        jacobi_eval: NonNegativeInt = 3,
        scale_embeds: bool = True,
        **kwargs: Any,
    ) -> None:
        check_init_args(PonderLM2, locals())
        if not jacobi_choices:
            raise UserError("PonderLM2: jacobi_choices=[] is invalid: give at least one Jacobi pass count, e.g. [2, 3]")
        super().__init__(**kwargs)
        self.last_jacobi_passes = jacobi_eval

    @property
    def n_iterations(self) -> int:
        return self.hparams.latent_steps + 1

    @property
    def embed_scale(self) -> float:
        return math.sqrt(2.5 * self.config.d_model) if self.hparams.scale_embeds else 1.0

    def build_latent(self) -> LatentRecurrence:
        """PonderLM-3 plugs its router in here."""
        return LatentRecurrence(self.backbone, self.hparams.latent_steps, self.embed_scale)

    @property
    def latent(self) -> LatentRecurrence:
        # Built lazily, like the base's recurrence: a subclass registers its router after __init__.
        if getattr(self, "_latent", None) is None:
            self._latent = self.build_latent()
        return self._latent

    def jacobi_passes(self) -> int:
        """J for this forward: in training a pure function of the step (so every rank runs the same
        passes under FSDP, and a resumed run draws what the original drew), else `jacobi_eval`."""
        if not self.training:
            return self.hparams.jacobi_eval
        return random.Random(self.global_step).choice(list(self.hparams.jacobi_choices))

    def hidden_states(self, inputs: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Trace]:
        self.last_jacobi_passes = self.jacobi_passes()
        return self.latent(inputs, valid, self.last_jacobi_passes)

    def new_cache(self, batch: int, max_len: int) -> LatentCache:
        if max_len > self.config.max_seq_len:
            raise UserError(f"prompt + new tokens = {max_len} tokens exceed the model's context max_seq_len={self.config.max_seq_len}")
        return self.latent.new_cache(batch, max_len)

    def extend(self, tokens: Tensor, valid: Tensor, cache: LatentCache) -> tuple[Tensor, Tensor, list[int]]:
        """Exact sequential decoding: K+1 single-slot passes per token (see `LatentRecurrence.extend`)."""
        return self.latent.extend(tokens, valid, cache)

    def row_decoder(self, cache: LatentCache) -> LatentRowDecoder:
        """Decoding where every row runs its own next slot in each pass (see `nn/rowwise.py`)."""
        return LatentRowDecoder(self.latent, cache)

    def _router_flops(self) -> float:
        router = self.latent.router
        return router.extra_flops_per_token() if router is not None else 0.0

    def realised_flops(self, active_fractions: list[float], context: int) -> dict[str, float]:
        """`active_fractions[k]`: fraction of tokens that ran slot k."""
        return flops.slot_forward_flops(self.config, context, active_fractions, self._router_flops())

    def full_depth_flops_per_token(self, context: int) -> float:
        """A training step's forward: build-up, Jacobi (at the mean J drawn) and final passes."""
        choices = self.hparams.jacobi_choices
        return flops.latent_training_forward_flops(self.config, context, self.hparams.latent_steps, sum(choices) / len(choices), self._router_flops())

    def training_step(self, batch: Tensor | dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train/jacobi_passes", float(self.last_jacobi_passes))
        trace = self.last_trace
        for k, w in enumerate(trace.scores, start=1):  # PonderLM-3: mean visibility of latent slot k
            if w is not None:
                self.log(f"train/w_mean/slot_{k}", w[trace.active[0]].mean())
        return loss
