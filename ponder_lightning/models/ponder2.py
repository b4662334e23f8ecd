"""PonderLM-2: before predicting each next token the model emits K latent thoughts, its own last
hidden states fed back as extra input slots right after the token (`nn/latent.py`)."""

from __future__ import annotations

import random
from typing import Any

from torch import Tensor

from ponder_lightning import flops
from ponder_lightning.errors import UserError
from ponder_lightning.models.base import CausalLMModule
from ponder_lightning.nn.cache import KVCache
from ponder_lightning.nn.latent import LatentRecurrence, LatentRowDecoder
from ponder_lightning.nn.recurrence import Trace
from ponder_lightning.validation import NonNegativeInt, PositiveInt, check_init_args

#: The authors' J draw in training (LUMIA-Group/PonderLM-2, random_jacobi_iterations): GPT-NeoX
#: `torch.randint(2, 5)` (modeling_gpt_neox.py), LLaMA `torch.randint(2, 4)` (modeling_llama.py).
AUTHORS_JACOBI_CHOICES = {"neox": (2, 3, 4), "llama": (2, 3)}


class PonderLM2(CausalLMModule):
    """Args:
    latent_steps: K latent slots per token (paper default 1; inference costs (K+1)x vanilla).
    jacobi_choices: the Jacobi passes J of each training step, drawn uniformly. None = the
        authors' code for the block: {2, 3, 4} on GPT-NeoX, {2, 3} on LLaMA.
    jacobi_eval: J at validation and test (the authors': 3). Decoding is exact and uses no J.
    scale_embeds: token embeddings x sqrt(2.5 d) (latents are raw final-norm hidden states).
        Default (null): on from scratch; with `pretrained`, as those weights were trained (off
        for Pythia).
    output_init_passes: R in the init sigma / sqrt(2 L R) of the residual-output projections
        (attention output, MLP output). None = the authors' code for the block: K+1 on GPT-NeoX,
        1 (no per-pass factor) on LLaMA. Ignored for a `pretrained` start.
    """

    def __init__(
        self,
        latent_steps: PositiveInt = 1,
        jacobi_choices: tuple[NonNegativeInt, ...] | None = None,
        jacobi_eval: NonNegativeInt = 3,
        scale_embeds: bool | None = None,
        output_init_passes: PositiveInt | None = None,
        **kwargs: Any,
    ) -> None:
        check_init_args(PonderLM2, locals())
        if jacobi_choices is not None and not jacobi_choices:
            raise UserError(
                "PonderLM2: jacobi_choices=[] is invalid: give at least one Jacobi pass count, e.g. [2, 3], "
                "or null for the authors' draw"
            )
        super().__init__(n_iterations=latent_steps + 1, **kwargs)
        self.scale_embeddings(scale_embeds, 2.5)
        self.latent = LatentRecurrence(self.backbone, latent_steps)
        # The base drew the output projections with R = K+1 (the GPT-NeoX code's factor); redraw them
        # where the configured R differs (the LLaMA code's R = 1 by default).
        if self.output_init_passes != self.n_iterations and kwargs.get("pretrained") is None:
            self.backbone.init_output_projections(passes_per_token=self.output_init_passes)

    @property
    def jacobi_choice_set(self) -> tuple[int, ...]:
        """The J values a training step draws from (`jacobi_choices`, or the authors' per block)."""
        choices = self.hparams.jacobi_choices
        return AUTHORS_JACOBI_CHOICES[self.config.block] if choices is None else tuple(choices)

    @property
    def output_init_passes(self) -> int:
        """R of the output projections' init (`output_init_passes`, or the authors' per block)."""
        passes = self.hparams.output_init_passes
        if passes is not None:
            return passes
        return self.n_iterations if self.config.block == "neox" else 1

    def jacobi_passes(self) -> int:
        """J for this forward: in training a pure function of the step (so every rank runs the same
        passes under FSDP, and a resumed run draws what the original drew), else `jacobi_eval`."""
        if not self.training:
            return self.hparams.jacobi_eval
        return random.Random(self.global_step).choice(list(self.jacobi_choice_set))

    def hidden_states(self, inputs: Tensor, valid: Tensor | None = None, gate: None = None) -> tuple[Tensor, Trace]:
        """The Jacobi training form (`gate` must be None: latent models have no token gate)."""
        if gate is not None:
            raise TypeError(f"{type(self).__name__} has no token gate to replace")
        return self.latent(inputs, valid, self.jacobi_passes())

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        self.check_context(max_len)
        return self.latent.new_cache(batch, max_len)

    def extend(self, tokens: Tensor, valid: Tensor, cache: KVCache) -> tuple[Tensor, Tensor, list[int]]:
        """Exact sequential decoding: K+1 single-slot passes per token (see `LatentRecurrence.extend`)."""
        return self.latent.extend(tokens, valid, cache)

    def row_decoder(self, cache: KVCache) -> LatentRowDecoder:
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
        choices = self.jacobi_choice_set
        return flops.latent_training_forward_flops(
            self.config, context, self.hparams.latent_steps, sum(choices) / len(choices), self._router_flops()
        )

    def training_step(self, batch: Tensor | dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        output = super().training_step(batch, batch_idx)
        self.log("train/jacobi_passes", float(self.jacobi_passes()))
        trace = output["trace"]
        for k, w in enumerate(trace.scores, start=1):  # PonderLM-3: mean visibility of latent slot k
            if w is not None:
                self.log(f"train/w_mean/slot_{k}", w[trace.active[0]].mean())
        return output
