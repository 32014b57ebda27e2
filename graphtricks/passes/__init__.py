"""Passes: one file each, all registered in ``PASSES`` by name."""

from graphtricks.passes.base import PASSES, GraphtricksPass, NoChangeWarning, pass_from_config, register_pass
from graphtricks.passes.bn_to_ln import BatchNormToLayerNorm, bn_to_ln
from graphtricks.passes.dropout import InsertDropout, insert_dropout

__all__ = [
    "PASSES",
    "GraphtricksPass",
    "NoChangeWarning",
    "pass_from_config",
    "register_pass",
    "BatchNormToLayerNorm",
    "InsertDropout",
    "bn_to_ln",
    "insert_dropout",
]
