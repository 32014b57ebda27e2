"""Old module paths, kept for one release: ``graphtricks.loading`` and friends still import.

The package was laid out anew as the pipeline (``io/``, ``capture/``, ``fxgraph/``, ``passes/``,
``onnx/checks/``). Code, notebooks and pickles that name an old module keep working: importing
one gives a stand-in module that warns once (``DeprecationWarning``) and hands out the names of
the modules that now hold them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

__all__ = ["MOVED", "RENAMED", "install"]

# old module -> the modules that now hold its names, searched in order
MOVED: dict[str, tuple[str, ...]] = {
    "graphtricks.loading": ("graphtricks.io.specs",),
    "graphtricks.saving": ("graphtricks.io.folder",),
    "graphtricks.recipe": ("graphtricks.io.recipe",),
    "graphtricks.shapes": ("graphtricks.capturing.shapes", "graphtricks.io.inputs"),
    "graphtricks.tracing": ("graphtricks.capturing.tracing", "graphtricks.fxgraph.kinds"),
    "graphtricks.mode_reads": ("graphtricks.capturing.mode_reads",),
    "graphtricks.modes": ("graphtricks.capturing.modes",),
    "graphtricks.probe": ("graphtricks.capturing.probe",),
    "graphtricks.inspection": ("graphtricks.capturing.summary",),
    "graphtricks.graph": ("graphtricks.fxgraph.nodes", "graphtricks.fxgraph.kinds"),
    "graphtricks.activations": ("graphtricks.fxgraph.activations",),
    "graphtricks.analysis": ("graphtricks.fxgraph.dataflow", "graphtricks.fxgraph.kinds"),
    "graphtricks.fastpath": ("graphtricks.fxgraph.fastpath",),
    "graphtricks.initializers": ("graphtricks.passes.init_draws",),
    "graphtricks.blocks": ("graphtricks.passes.residual_blocks", "graphtricks.passes.residual_graph"),
    "graphtricks.onnx.check_numeric": ("graphtricks.onnx.checks.numeric", "graphtricks.onnx.inputs"),
    "graphtricks.onnx.check_dropout": ("graphtricks.onnx.checks.dropout", "graphtricks.onnx.checks"),
    "graphtricks.onnx.check_stochastic": ("graphtricks.onnx.checks.stochastic", "graphtricks.onnx.checks"),
    "graphtricks.onnx.check_graphs": ("graphtricks.onnx.checks.graphs",),
}


# old package or module -> its new name: the module itself under the old name (same object, so
# classes, pickles and ``isinstance`` agree). These were renamed because each shared its name with
# a public function (``gt.rewrite``, ``gt.capture``, ``gt.experiment``).
RENAMED: dict[str, str] = {
    "graphtricks.rewrite": "graphtricks.rewriting",
    "graphtricks.capture": "graphtricks.capturing",
}


def _renamed(fullname: str) -> str | None:
    """The new name of ``fullname`` when it is (inside) a renamed module, else None."""
    for old, new in RENAMED.items():
        if fullname == old or fullname.startswith(old + "."):
            return new + fullname[len(old):]
    return None


class _RenamedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds a renamed module by its old name and gives the module itself, with a warning.

    It goes first on ``sys.meta_path``: otherwise ``graphtricks.capture.fold`` would be found again
    on the renamed package's path and run as a second copy of the module.
    """

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if _renamed(fullname) else None

    def create_module(self, spec):
        new = _renamed(spec.name)
        warnings.warn(f"{spec.name} is now {new}; the old name goes away in the next release", DeprecationWarning,
                      stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the module ran under its new name."""


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module path and builds its stand-in."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        return types.ModuleType(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        targets = MOVED[module.__name__]
        warnings.warn(
            f"{module.__name__} moved to {' and '.join(targets)}; the old path goes away in the next release",
            DeprecationWarning,
            stacklevel=2,
        )

        def __getattr__(name: str):
            for target in targets:
                held = importlib.import_module(target)
                if hasattr(held, name):
                    return getattr(held, name)
            raise AttributeError(f"module {module.__name__!r} (now {' and '.join(targets)}) has no attribute {name!r}")

        module.__getattr__ = __getattr__


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
    if not any(isinstance(f, _RenamedModules) for f in sys.meta_path):
        sys.meta_path.insert(0, _RenamedModules())
