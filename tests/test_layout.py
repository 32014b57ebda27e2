"""The package layout: stages import only earlier stages, passes keep no run state, old paths import."""

from __future__ import annotations

import ast
import importlib
import pathlib
import sys
import warnings

import pytest
import torch
import torch.fx as fx

import graphtricks as gt
from graphtricks.passes.base import PassRun
from tests.conftest import example

PACKAGE = pathlib.Path(gt.__file__).parent

# Where each part of the package stands in the pipeline: a module may import its own rank and
# lower ones. The longest matching prefix wins.
RANKS = {
    "graphtricks._compat": 0, "graphtricks.errors": 0, "graphtricks.report": 0, "graphtricks.layers": 0,
    "graphtricks.suggest": 0, "graphtricks.collector": 0, "graphtricks.io.inputs": 0, "graphtricks.io.specs": 0,
    "graphtricks.fxgraph": 1,
    "graphtricks.capturing": 2,
    "graphtricks.passes": 3,
    "graphtricks.io.recipe": 4, "graphtricks.rewriting": 4, "graphtricks.functional": 4,
    "graphtricks.io": 5, "graphtricks.onnx": 5,
    "graphtricks.api": 6, "graphtricks.experiments": 6,
    "graphtricks.cli": 7, "graphtricks.__main__": 7,
}


def _rank(module: str) -> int | None:
    found = [p for p in RANKS if module == p or module.startswith(p + ".")]
    return RANKS[max(found, key=len)] if found else None


def _imports() -> dict[str, set[str]]:
    """Every graphtricks module and the graphtricks modules it imports (anywhere in its code)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("graphtricks."):
                found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("graphtricks.")}
        out[name] = found
    return out


def test_every_module_has_a_place_in_the_pipeline_and_imports_no_later_stage():
    imports = _imports()
    upward = []
    for module, targets in imports.items():
        if module in ("graphtricks", "graphtricks.io", "graphtricks.fxgraph"):  # package indexes
            continue
        assert _rank(module) is not None, f"{module} has no place in RANKS: add it where it belongs"
        for target in targets:
            if target in imports and _rank(target) > _rank(module):
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_no_import_cycle_between_modules():
    imports = _imports()
    def with_packages(module: str, targets: set[str]) -> set[str]:
        """Importing ``a.b.c`` runs ``a.b``'s ``__init__`` too (unless ``module`` is inside ``a.b``)."""
        out = set(targets)
        for t in targets:
            parts = t.split(".")
            out |= {".".join(parts[:i]) for i in range(2, len(parts)) if not module.startswith(".".join(parts[:i]) + ".")}
        return out

    graph = {
        m: {t for t in with_packages(m, ts) if t in imports and t != m and not m.startswith(t + ".")}
        for m, ts in imports.items()
    }
    # a package's __init__ re-exporting its own submodules is not a cycle
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    done, cycles = set(), []

    def visit(node, stack):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in done:
            return
        for nxt in graph[node]:
            visit(nxt, stack + [node])
        done.add(node)

    for node in graph:
        visit(node, [])
    assert not cycles, cycles


def test_a_pass_object_runs_twice_and_each_rewrite_reports_its_own_changes():
    model, (x,) = example("models/plain_cnn.py:PlainCNN")
    p = gt.InsertDropout(0.1)
    first = gt.rewrite(model, [p], (x,))
    second = gt.rewrite(model, [p, gt.Initialize("auto")], (x,))
    assert first.runs[0].changes and [c.to_dict() for c in first.runs[0].changes] == [
        c.to_dict() for c in second.runs[0].changes
    ]
    assert second.runs[1].changes and all(c.pass_name == "init" for c in second.runs[1].changes)
    assert len(second.report.changes) == sum(len(r.changes) for r in second.runs)
    with pytest.raises(gt.GraphtricksError, match="outside a run"):
        p.changes  # noqa: B018 - the pass keeps nothing once a run is over


def test_a_pass_called_on_its_own_graph_module_returns_its_run():
    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
    result = gt.InsertDropout(0.2)(gm)
    assert result.modified and isinstance(result.run, PassRun)
    assert [c.action for c in result.run.changes] == ["inserted"]
    again = gt.InsertDropout(0.2)(gm)  # a dropout already follows the ReLU
    assert not again.run.changes


@pytest.mark.parametrize("old, names", [
    ("graphtricks.loading", ["load_model"]),
    ("graphtricks.shapes", ["make_example_inputs", "propagate_shapes"]),
    ("graphtricks.graph", ["owner_path", "DROPOUT_FUNCTIONS"]),
    ("graphtricks.onnx.check_numeric", ["check_infer_vs_eager", "InputSet"]),
])
def test_old_module_paths_still_import_with_a_deprecation_warning(old, names):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match="moved to"):
        module = importlib.import_module(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in names:
            assert callable(getattr(module, name)) or getattr(module, name) is not None
    with pytest.raises(AttributeError, match="no attribute"):
        module.no_such_name  # noqa: B018


def test_every_public_name_means_one_object():
    """No module is named like a public function (``gt.rewrite`` was also ``graphtricks.rewrite``)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert not (modules & set(gt.__all__)) - {"recipe"}  # gt.recipe is the recipe module itself


def test_renamed_modules_import_by_their_old_name_as_the_same_object():
    import graphtricks.capturing.fold as fold  # the form the shared name used to break
    import graphtricks.rewriting as rewriting

    import graphtricks.experiments.run as run

    for old, new in (("graphtricks.capture.fold", fold), ("graphtricks.rewrite", rewriting),
                     ("graphtricks.experiment.run", run)):
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match="is now"):
            assert importlib.import_module(old) is new
    assert callable(gt.rewrite) and callable(gt.capture) and callable(gt.experiment)



def _package_of(module: str, path: pathlib.Path) -> str:
    return module if path.name == "__init__.py" else module.rsplit(".", 1)[0]


def test_no_module_imports_through_its_own_package_index():
    """Inside a package, import the module that holds a name, not the package's ``__init__``.

    ``from graphtricks.onnx import fixups`` in ``onnx/export.py`` runs ``onnx/__init__`` (which imports
    ``export``) to reach a sibling; ``import graphtricks`` inside the package runs the top index.
    """
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        if path.name in ("__init__.py", "__main__.py"):  # an index, or a package's own entry point
            continue
        package = _package_of(module, path)
        ancestors = {".".join(package.split(".")[:i]) for i in range(1, package.count(".") + 2)}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in ancestors:
                found.append(f"{module}: from {node.module} import ...")
            elif isinstance(node, ast.Import):
                found += [f"{module}: import {a.name}" for a in node.names if a.name in ancestors]
    assert not found, found


def test_no_function_is_longer_than_a_hundred_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 100:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
