"""Passes: one file each, all registered in ``PASSES`` by name."""

from graphtricks.passes.base import PASSES, GraphtricksPass, NoChangeWarning, pass_from_config, register_pass
from graphtricks.passes.dropout import InsertDropout, insert_dropout

__all__ = [
    "PASSES",
    "GraphtricksPass",
    "NoChangeWarning",
    "pass_from_config",
    "register_pass",
    "InsertDropout",
    "insert_dropout",
]
