"""The vanilla Pythia baseline: the backbone run once per token."""

from ponder_lightning.models.base import CausalLMModule


class VanillaLM(CausalLMModule):
    """Pythia as released: every comparison ('x vanilla' FLOPs, perplexity gaps) is against this."""
