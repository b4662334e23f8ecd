"""LoopTransformer: the whole layer stack applied R times, the final norm once at the end."""

from __future__ import annotations

import math
from typing import Any

from ponder_lightning.models.recurrent import RecurrentLM
from ponder_lightning.nn.recurrence import Feedback, LoopFeedback
from ponder_lightning.validation import PositiveInt, check_init_args


class LoopTransformer(RecurrentLM):
    """Args:
    loops: passes of the layer stack per token R (default 4: PonderLM s=3's FLOPs).
    input_injection: feed h + E0 to every later pass (the looped-transformer literature's form).
    """

    def __init__(self, loops: PositiveInt = 4, input_injection: bool = False, **kwargs: Any) -> None:
        check_init_args(LoopTransformer, locals())
        super().__init__(**kwargs)

    @property
    def n_iterations(self) -> int:
        return self.hparams.loops

    @property
    def embed_scale(self) -> float:
        return math.sqrt(2.5 * self.config.d_model) if self.scales_embeddings else 1.0

    def build_feedback(self) -> Feedback:
        return LoopFeedback(input_injection=self.hparams.input_injection)
