"""The optimisation of a graph from torch's ``torch.export``-based exporter: onnxscript's default,
less the rewrite rules whose matching grows with the square of the graph.

onnxscript's optimizer (``optimize_ir``, what ``torch.onnx.export(..., optimize=True)`` runs) folds
constants and applies its default rewrite rules, twice. One default rule, ``SlicesSplit`` (two
``Slice`` of one tensor into a ``Split``), has a pattern with two output nodes; onnxscript matches
such a pattern by listing every node of the graph for every node it tries, so its cost grows
with the square of the graph: measured on one CPU thread, the optimisation of a Swin-T pair took
22 s with it and 6.7 s without, a MobileNetV3-Small pair 1.7 s and 1.1 s. Its pattern is a
``Slice`` of four inputs, and torch's exporter writes every ``Slice`` with five (the steps), so
the rule never rewrites a graph of this path: left out, every graph is the same (checked on
eight torchvision, timm and Hugging Face models, both graphs of each pair). Every other step is
onnxscript's own, in its order.
"""

from __future__ import annotations

from typing import Any

__all__ = ["optimise"]

_ITERATIONS = 2  # optimize_ir's default: a rewrite can open a fold, and the reverse


def _linear_rules() -> Any:
    """onnxscript's default rewrite rules with one output node each, or None where the default
    list is not where this onnxscript keeps it."""
    import onnxscript.rewriter as rewriter

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if rules is None:
        return None

    def single_output(rule: Any) -> bool:
        pattern = getattr(getattr(rule, "_matcher", None), "pattern", None)
        return getattr(pattern, "has_single_output_node", True)

    return tuple(rule for rule in rules if single_output(rule))


def optimise(model: Any) -> None:
    """Optimises an ``onnx_ir`` model in place (see the module's docstring).

    Where this onnxscript does not expose what is needed, its ``optimize_ir`` runs instead.
    """
    import onnx_ir.passes.common as common
    import onnxscript.optimizer
    import onnxscript.rewriter

    rules = _linear_rules()
    if rules is None:
        onnxscript.optimizer.optimize_ir(model)
        return
    onnxscript.optimizer.inline(model)
    rewrite = onnxscript.rewriter.RewritePass(rules)
    cleanup = [common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(),
               common.RemoveUnusedOpsetsPass()]
    for _ in range(_ITERATIONS):
        changed = onnxscript.optimizer.fold_constants(model, onnx_shape_inference=True).modified
        changed = rewrite(model).modified or changed
        for step in cleanup:
            changed = step(model).modified or changed
        if not changed:
            break
    for step in (
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    ):
        step(model)
