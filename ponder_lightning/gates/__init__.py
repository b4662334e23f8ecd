"""Pluggable gates: one class each, swapped from YAML (`configs/gates/*.yaml`)."""

from ponder_lightning.gates.base import AlwaysContinue, Gate, GateDecision
from ponder_lightning.gates.bottom_k import BottomKGate
from ponder_lightning.gates.fixed import FixedRatioGate
from ponder_lightning.gates.mlp import PerIterationMLPGate, SingleMLPGate
from ponder_lightning.gates.regularizers import BottomKPonderLoss, NoPonderLoss, PonderRegularizer

__all__ = [
    "AlwaysContinue",
    "BottomKGate",
    "BottomKPonderLoss",
    "FixedRatioGate",
    "Gate",
    "GateDecision",
    "NoPonderLoss",
    "PonderRegularizer",
    "PerIterationMLPGate",
    "SingleMLPGate",
]
