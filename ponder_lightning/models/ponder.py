"""PonderLM: every token runs the model s+1 times; between passes its input embedding grows by the
probability-weighted mixture of the embedding table under the current prediction."""

from __future__ import annotations

from typing import Any

from ponder_lightning.errors import UserError
from ponder_lightning.models.recurrent import RecurrentLM
from ponder_lightning.nn.recurrence import PonderFeedback
from ponder_lightning.validation import NonNegativeInt, PositiveInt, check_init_args


class PonderLM(RecurrentLM):
    """Args:
    pondering_steps: extra passes s (paper default 3, i.e. 4 passes and 4x forward FLOPs).
    mixture_top_k: mix only the k most probable tokens (paper: k=100 matches the full vocabulary).
    multiply_pondering_steps: start from s * E0 instead of E0 (the authors use it at >= 410M).
    Token embeddings (and so the mixture) are scaled by sqrt(d) with `scale_embeds`.
    """

    def __init__(
        self,
        pondering_steps: NonNegativeInt = 3,
        mixture_top_k: PositiveInt | None = None,
        multiply_pondering_steps: bool = False,
        **kwargs: Any,
    ) -> None:
        check_init_args(PonderLM, locals())
        start = float(pondering_steps) if multiply_pondering_steps else 1.0
        feedback = PonderFeedback(top_k=mixture_top_k, start_multiplier=start)
        super().__init__(n_iterations=pondering_steps + 1, feedback=feedback, embed_scale_factor=1.0, **kwargs)
        if mixture_top_k is not None and mixture_top_k > self.config.vocab_size:
            raise UserError(
                f"PonderLM: mixture_top_k={mixture_top_k} exceeds the vocabulary ({self.config.vocab_size} ids): "
                "lower it, or leave it null to mix the whole vocabulary"
            )
