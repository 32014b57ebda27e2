"""Passes: one file each (with the helpers only it needs beside it), all registered in ``PASSES``.

The functional twins (``insert_dropout`` ...) are in :mod:`graphtricks.functional`.
"""

from graphtricks.passes.base import (
    PASSES,
    GraphtricksPass,
    NoChangeWarning,
    PassNoteWarning,
    SelectionWarning,
    pass_from_config,
    register_pass,
)
from graphtricks.passes.bn_to_ln import BatchNormToLayerNorm
from graphtricks.passes.dropout import InsertDropout
from graphtricks.passes.init import Initialize
from graphtricks.passes.residual import AddResidual, candidate_blocks

__all__ = [
    "PASSES",
    "GraphtricksPass",
    "NoChangeWarning",
    "PassNoteWarning",
    "SelectionWarning",
    "pass_from_config",
    "register_pass",
    "AddResidual",
    "BatchNormToLayerNorm",
    "Initialize",
    "InsertDropout",
    "candidate_blocks",
]
