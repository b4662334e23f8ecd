"""The vanilla Pythia baseline: the backbone run once per token."""

from typing import Any

from ponder_lightning.models.recurrent import TokenRecurrentLM
from ponder_lightning.nn.recurrence import Feedback


class VanillaLM(TokenRecurrentLM):
    """Pythia as released: every comparison ('x vanilla' FLOPs, perplexity gaps) is against this."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(n_iterations=1, feedback=Feedback(), **kwargs)
