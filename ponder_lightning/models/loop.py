"""LoopTransformer: the whole layer stack applied R times, the final norm once at the end."""

from __future__ import annotations

from typing import Any

from ponder_lightning.models.recurrent import RecurrentLM
from ponder_lightning.nn.recurrence import LoopFeedback
from ponder_lightning.validation import PositiveInt, check_init_args


class LoopTransformer(RecurrentLM):
    """Args:
    loops: passes of the layer stack per token R (default 4: PonderLM s=3's FLOPs).
    input_injection: feed h + E0 to every later pass (the looped-transformer literature's form).
    Token embeddings are scaled by sqrt(2.5 d) with `scale_embeds`.
    """

    def __init__(self, loops: PositiveInt = 4, input_injection: bool = False, **kwargs: Any) -> None:
        check_init_args(LoopTransformer, locals())
        super().__init__(n_iterations=loops, feedback=LoopFeedback(input_injection), embed_scale_factor=2.5, **kwargs)
