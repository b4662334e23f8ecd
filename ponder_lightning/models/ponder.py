"""PonderLM: every token runs the model s+1 times; between passes its input embedding grows by the
probability-weighted mixture of the embedding table under the current prediction."""

from __future__ import annotations

import math
from typing import Any

from ponder_lightning.models.recurrent import RecurrentLM
from ponder_lightning.nn.recurrence import Feedback, PonderFeedback
from ponder_lightning.validation import NonNegativeInt, PositiveInt, check_init_args


class PonderLM(RecurrentLM):
    """Args:
    pondering_steps: extra passes s (paper default 3, i.e. 4 passes and 4x forward FLOPs).
    mixture_top_k: mix only the k most probable tokens (paper: k=100 matches the full vocabulary).
    multiply_pondering_steps: start from s * E0 instead of E0 (the authors use it at >= 410M).
    """

    def __init__(
        self,
        pondering_steps: NonNegativeInt = 3,
        mixture_top_k: PositiveInt | None = None,
        multiply_pondering_steps: bool = False,
        **kwargs: Any,
    ) -> None:
        check_init_args(PonderLM, locals())
        super().__init__(**kwargs)

    @property
    def n_iterations(self) -> int:
        return self.hparams.pondering_steps + 1

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.config.d_model) if self.scales_embeddings else 1.0

    def build_feedback(self) -> Feedback:
        hp = self.hparams
        start = float(hp.pondering_steps) if hp.multiply_pondering_steps else 1.0
        return PonderFeedback(self.embed_scale, top_k=hp.mixture_top_k, start_multiplier=start)
