"""Pluggable gates: one class each, swapped from YAML (`configs/gates/*.yaml`), on the protocol
of `nn/gate.py` (re-exported here for configs and users)."""

from ponder_lightning.gates.bottom_k import BottomKGate
from ponder_lightning.gates.controls import (
    AtThreshold,
    FirstPassOnly,
    FullDepth,
    MatchedRandomPruning,
    OracleDepth,
    ReadoutAtNeed,
    RecordingReadouts,
)
from ponder_lightning.gates.fixed import FixedRatioGate
from ponder_lightning.gates.mlp import PerIterationMLPGate, SingleMLPGate
from ponder_lightning.gates.regularizers import BottomKPonderLoss, NoPonderLoss, PonderRegularizer
from ponder_lightning.gates.shuffled import ShuffledHalting
from ponder_lightning.nn.gate import AlwaysContinue, Gate, GateDecision

__all__ = [
    "AlwaysContinue",
    "AtThreshold",
    "BottomKGate",
    "BottomKPonderLoss",
    "FirstPassOnly",
    "FixedRatioGate",
    "FullDepth",
    "Gate",
    "GateDecision",
    "MatchedRandomPruning",
    "NoPonderLoss",
    "OracleDepth",
    "PonderRegularizer",
    "PerIterationMLPGate",
    "ReadoutAtNeed",
    "RecordingReadouts",
    "ShuffledHalting",
    "SingleMLPGate",
]
