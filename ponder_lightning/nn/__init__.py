"""Plain-PyTorch building blocks (no Lightning): backbone, configs, checkpoint conversion."""

from ponder_lightning.nn.backbone import Backbone, KVHook, causal_mask, positions_from_valid
from ponder_lightning.nn.config import PRESETS, BackboneConfig, backbone_config, pad_vocab

__all__ = [
    "Backbone",
    "BackboneConfig",
    "KVHook",
    "PRESETS",
    "backbone_config",
    "causal_mask",
    "positions_from_valid",
    "pad_vocab",
]
