"""Passes: one file each, all registered in ``PASSES`` by name."""

from graphtricks.passes.base import (
    PASSES,
    GraphtricksPass,
    NoChangeWarning,
    pass_from_config,
    register_pass,
)
from graphtricks.passes.bn_to_ln import BatchNormToLayerNorm, bn_to_ln
from graphtricks.passes.dropout import InsertDropout, insert_dropout
from graphtricks.passes.init import Initialize, initialize
from graphtricks.passes.residual import AddResidual, add_residual, candidate_blocks

__all__ = [
    "PASSES",
    "GraphtricksPass",
    "NoChangeWarning",
    "pass_from_config",
    "register_pass",
    "AddResidual",
    "BatchNormToLayerNorm",
    "Initialize",
    "InsertDropout",
    "add_residual",
    "bn_to_ln",
    "candidate_blocks",
    "initialize",
    "insert_dropout",
]
