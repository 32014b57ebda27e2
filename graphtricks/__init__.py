"""graphtricks: apply classic training techniques to an existing PyTorch model with torch.fx.

Example:
    >>> import graphtricks as gt
    >>> result = gt.rewrite(model, [gt.InsertDropout(p=0.1)], example_inputs=(x,))
    >>> result.model, result.report
"""

from graphtricks.capture import Region, RegionTree, capture
from graphtricks.errors import GraphtricksError
from graphtricks.passes import (
    PASSES,
    AddResidual,
    BatchNormToLayerNorm,
    GraphtricksPass,
    Initialize,
    InsertDropout,
    NoChangeWarning,
    add_residual,
    bn_to_ln,
    initialize,
    insert_dropout,
)
from graphtricks import recipe
from graphtricks.loading import load_model
from graphtricks.report import Change, Report
from graphtricks.rewrite import RewriteResult, rewrite
from graphtricks.saving import load, save

__version__ = "0.1.0"

__all__ = [
    "AddResidual",
    "BatchNormToLayerNorm",
    "GraphtricksError",
    "GraphtricksPass",
    "Initialize",
    "InsertDropout",
    "NoChangeWarning",
    "PASSES",
    "Change",
    "Region",
    "RegionTree",
    "Report",
    "RewriteResult",
    "capture",
    "add_residual",
    "bn_to_ln",
    "initialize",
    "insert_dropout",
    "load",
    "load_model",
    "recipe",
    "rewrite",
    "save",
]
