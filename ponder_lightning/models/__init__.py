"""LightningModules: one file per model on a shared base."""

from ponder_lightning.models.adaponder import AdaPonderLM
from ponder_lightning.models.base import CausalLMModule
from ponder_lightning.models.loop import LoopTransformer
from ponder_lightning.models.ponder import PonderLM
from ponder_lightning.models.ponder2 import PonderLM2
from ponder_lightning.models.ponder3 import PonderLM3
from ponder_lightning.models.recurrent import RecurrentLM, TokenRecurrentLM
from ponder_lightning.models.vanilla import VanillaLM

__all__ = [
    "AdaPonderLM",
    "CausalLMModule",
    "LoopTransformer",
    "PonderLM",
    "PonderLM2",
    "PonderLM3",
    "RecurrentLM",
    "TokenRecurrentLM",
    "VanillaLM",
]
