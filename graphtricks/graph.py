"""Graph helpers shared by passes, written once: names, ownership, insertion, outputs."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = [
    "owner_path",
    "node_where",
    "unique_attr_name",
    "insert_module_after",
    "feeds_model_output",
    "DROPOUT_MODULES",
    "DROPOUT_FUNCTIONS",
    "is_dropout",
]

DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
DROPOUT_FUNCTIONS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.dropout, torch.feature_dropout, torch.alpha_dropout,
}

# Ops that only move or view values: a value reaching the output through them is still an output.
_PASS_THROUGH_METHODS = {
    "view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "contiguous",
    "expand", "to", "float", "half", "type_as", "clone", "detach",
}
_PASS_THROUGH_MODULES = (nn.Flatten, nn.Identity, nn.Unflatten)
_PASS_THROUGH_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}


def owner_path(node: fx.Node) -> str:
    """The module (relative to the graph's root) whose own code created ``node``; "" = root."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if node.op == "call_module" and stack:
        stack = stack[:-1]  # a leaf is on the stack while its call is recorded; its caller owns it
    return stack[-1][0] if stack else ""


def node_where(prefix: str, node: fx.Node) -> str:
    """A qualified name for a node: the module path for module calls, ``owner.node`` otherwise."""
    if node.op == "call_module":
        local = str(node.target)
    else:
        owner = owner_path(node)
        local = f"{owner}.{node.name}" if owner else node.name
    return f"{prefix}.{local}" if prefix else local


def unique_attr_name(gm: nn.Module, parent_path: str, base: str) -> str:
    """A submodule path ``parent_path.base`` (``_1``, ``_2`` … appended) that is free in ``gm``."""
    parent = gm.get_submodule(parent_path) if parent_path and _has_module(gm, parent_path) else None
    taken = set(dict(parent.named_children()).keys()) | set(vars(parent)) if parent is not None else set()
    if not parent_path:
        taken = set(dict(gm.named_children()).keys()) | set(vars(gm)) | set(dir(type(gm)))
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return f"{parent_path}.{name}" if parent_path else name


def _has_module(gm: nn.Module, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False


def insert_module_after(gm: fx.GraphModule, node: fx.Node, path: str, module: nn.Module) -> fx.Node:
    """Add ``module`` at ``path`` and route every user of ``node`` through it.

    The new node copies ``node``'s tensor metadata (callers insert shape-preserving modules).
    """
    gm.add_submodule(path, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(path, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    for key in ("tensor_meta", "nn_module_stack"):
        if key in node.meta:
            new.meta[key] = node.meta[key]
    return new


def is_dropout(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True when ``node`` applies dropout in any form."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), DROPOUT_MODULES)
    if node.op == "call_function":
        return node.target in DROPOUT_FUNCTIONS
    return False


def _passes_through(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_method":
        return node.target in _PASS_THROUGH_METHODS
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _PASS_THROUGH_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_THROUGH_FUNCTIONS
    return False


def feeds_model_output(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True when ``node``'s value is a model output, directly or through views/reshapes.

    Relies on ``node.meta["gt_model_output"]`` set by the shape run; a graph that was never
    shape-propagated counts its own outputs as model outputs (the safe side).
    """
    seen: set[fx.Node] = set()
    todo = [node]
    shaped = any("tensor_meta" in n.meta for n in gm.graph.nodes)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.meta.get("gt_model_output"):
            return True
        for user in n.users:
            if user.op == "output" and not shaped:
                return True
            if _passes_through(user, gm):
                todo.append(user)
    return False
