"""ponder_lightning: Lightning modules for language models that ponder (run the same network
several times per token) and learn per token how many passes are enough."""

__version__ = "0.1.0"
