"""graphtricks: apply classic training techniques to an existing PyTorch model with torch.fx.

Example:
    >>> import graphtricks as gt
    >>> result = gt.rewrite(model, [gt.InsertDropout(p=0.1)], example_inputs=(x,))
    >>> result.model, result.report
"""

from graphtricks import _compat

_compat.install()  # old module paths (graphtricks.loading, ...) keep importing for one release

from graphtricks.capture import Region, RegionTree, capture  # noqa: E402
from graphtricks.errors import GraphtricksError
from graphtricks.io import recipe
from graphtricks.io.folder import load, save
from graphtricks.io.specs import load_model
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
from graphtricks.report import Change, Report
from graphtricks.rewrite import RewriteResult, rewrite

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
