"""LightningModules: one file per model on a shared base."""

from ponder_lightning.models.base import CausalLMModule
from ponder_lightning.models.vanilla import VanillaLM

__all__ = ["CausalLMModule", "VanillaLM"]
