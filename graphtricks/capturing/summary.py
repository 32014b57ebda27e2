"""Summary (``graphtricks inspect``): what a captured model is made of (regions, activations, norms, parameters)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch.fx as fx
from torch import nn

from graphtricks.capturing.regions import RegionTree
from graphtricks.fxgraph.activations import ACTIVATION_MODULES, activation_name
from graphtricks.fxgraph.kinds import NORM_FUNCTIONS, NORM_TYPES, is_builtin_module
from graphtricks.fxgraph.lookup import submodule

__all__ = ["summarize", "NORM_MODULES"]

# The norms passes know (with a learnable scale), plus LocalResponseNorm, which has none.
NORM_MODULES = (*NORM_TYPES, nn.LocalResponseNorm)


def _norm_name(module: nn.Module) -> str | None:
    for cls in NORM_MODULES:
        if isinstance(module, cls):
            # A subclass (timm BatchNormAct2d) is reported under its own name.
            return type(module).__name__
    return None


def summarize(tree: RegionTree) -> dict[str, Any]:
    """Counts of activations, norms and parameters, and the region tree, as JSON-able data.

    Activations and norms are counted where they are computed: graph nodes in traced
    regions (module, functional and method forms) and modules inside opaque regions.
    """
    activations: Counter[str] = Counter()
    norms: Counter[str] = Counter()
    forms: Counter[str] = Counter()
    for region in tree.regions():
        if region.kind == "traced":
            gm: fx.GraphModule = region.graph_module
            for node in gm.graph.nodes:
                act = activation_name(node, gm)
                if act:
                    activations[act] += 1
                    forms[{"call_module": "module", "call_function": "function", "call_method": "method"}[node.op]] += 1
                if node.op == "call_module":
                    norm = _norm_name(submodule(gm, node.target))
                    if norm:
                        norms[norm] += 1
                elif node.op == "call_function" and node.target in NORM_FUNCTIONS:
                    norms[f"F.{NORM_FUNCTIONS[node.target]}"] += 1
        else:
            own = _norm_name(region.module)
            if own:
                norms[own] += 1
            for child in region.module.children():
                if not is_builtin_module(child):
                    continue
                if type(child) in ACTIVATION_MODULES:
                    activations[ACTIVATION_MODULES[type(child)]] += 1
                    forms["module in opaque region"] += 1
                norm = _norm_name(child)
                if norm:
                    norms[norm] += 1
    params = list(tree.model.parameters())
    regions = tree.regions()
    return {
        "model": type(tree.model).__name__,
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "traced_fraction": round(tree.traced_fraction(), 4),
        "regions": {
            "traced": sum(r.kind == "traced" for r in regions),
            "opaque": sum(r.kind == "opaque" for r in regions),
        },
        "activations": dict(activations.most_common()),
        "activation_forms": dict(forms.most_common()),
        "norms": dict(norms.most_common()),
        "tree": tree.root.to_dict(),
    }
