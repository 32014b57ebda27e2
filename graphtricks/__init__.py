"""graphtricks: apply classic training techniques to an existing PyTorch model with torch.fx.

Example:
    >>> import graphtricks as gt
    >>> result = gt.rewrite(model, [gt.InsertDropout(p=0.1)], example_inputs=(x,))
    >>> result.model, result.report

The names below are imported on first use (PEP 562), so ``import graphtricks`` and the
command line's ``--help`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from graphtricks import _compat

_compat.install()  # old module paths (graphtricks.loading, ...) keep importing for one release

__version__ = "0.1.0"

# public name -> the module that holds it
_LAZY: dict[str, str] = {
    "Region": "graphtricks.capturing",
    "RegionTree": "graphtricks.capturing",
    "capture": "graphtricks.capturing",
    "GraphtricksError": "graphtricks.errors",
    "SelectionError": "graphtricks.errors",
    "recipe": "graphtricks.io.recipe",
    "load": "graphtricks.io.folder",
    "save": "graphtricks.io.folder",
    "load_model": "graphtricks.io.specs",
    "map_state_dict": "graphtricks.io.checkpoints",
    "export": "graphtricks.api",
    "validate": "graphtricks.api",
    "Change": "graphtricks.report",
    "Report": "graphtricks.report",
    "RewriteResult": "graphtricks.rewriting",
    "rewrite": "graphtricks.rewriting",
    "experiment": "graphtricks.experiment",
    "MCSamples": "graphtricks.onnx.sampling",
    "mc_sample": "graphtricks.onnx.sampling",
    **{
        name: "graphtricks.passes"
        for name in (
            "PASSES", "AddResidual", "BatchNormToLayerNorm", "GraphtricksPass", "Initialize", "InsertDropout",
            "NoChangeWarning", "PassNoteWarning", "SelectionWarning",
        )
    },
    **{name: "graphtricks.functional" for name in ("add_residual", "bn_to_ln", "initialize", "insert_dropout")},
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'graphtricks' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    # ``recipe`` is the module itself; the rest are names inside their module
    value = module if name == "recipe" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


class _Package(types.ModuleType):
    """The package object: importing a module by its old name never hides the public name.

    Every module's name differs from every public name now; the old names of the renamed modules
    (``graphtricks.rewrite``, ``graphtricks.capture``: see ``_compat.RENAMED``) and the old path
    ``graphtricks.recipe`` still import for one release, and must leave ``gt.rewrite``,
    ``gt.capture`` and ``gt.recipe`` what they are.
    """

    def __setattr__(self, name: str, value) -> None:
        if name in ("rewrite", "capture", "recipe", "experiment") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from graphtricks.capturing import Region, RegionTree, capture  # noqa: F401
    from graphtricks.errors import GraphtricksError, SelectionError  # noqa: F401
    from graphtricks.experiment import experiment  # noqa: F401
    from graphtricks.io import recipe  # noqa: F401
    from graphtricks.io.folder import load, save  # noqa: F401
    from graphtricks.io.specs import load_model  # noqa: F401
    from graphtricks.functional import add_residual, bn_to_ln, initialize, insert_dropout  # noqa: F401
    from graphtricks.passes import (  # noqa: F401
        PASSES, AddResidual, BatchNormToLayerNorm, GraphtricksPass, Initialize, InsertDropout, NoChangeWarning,
        SelectionWarning,
    )
    from graphtricks.onnx.sampling import MCSamples, mc_sample  # noqa: F401
    from graphtricks.report import Change, Report  # noqa: F401
    from graphtricks.rewriting import RewriteResult, rewrite  # noqa: F401
