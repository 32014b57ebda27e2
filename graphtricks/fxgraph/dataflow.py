"""Dataflow analyses of traced graphs: which nonlinearity each value reaches, and residual branches.

Both read one traced region and change nothing. The *consumer map* walks the graph backwards
once and gives every node the nonlinearity its value reaches, past ops that only carry a value
on (norms, dropout, reshapes, pooling, residual adds); graph-aware initializers take their
gains from it. The *residual-branch finder* names, for each residual sum ``F(x) + S(x)``, the
norm that ends the branch ``F``, so that it can start at γ = 0 (the block starts as ``S``).
Where a module is opaque (no graph), what it does with its input is told from its type.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphtricks.fxgraph.activations import (
    ACTIVATION_MODULES,
    activation_name,
    module_activation_kwargs,
    node_activation_kwargs,
)
from graphtricks.fxgraph.kinds import (
    DROPOUT_FUNCTIONS,
    DROPOUT_MODULES,
    NORM_FUNCTIONS,
    NORM_TYPES,
    VIEW_METHODS,
    is_builtin_module,
)
from graphtricks.fxgraph.lookup import submodule
from graphtricks.fxgraph.nodes import (
    ancestors,
    is_dropout,
    node_where,
    owner_path,
)
from graphtricks.layers.residual import REGISTRY, Residual, ResidualSpan

__all__ = ["Activation", "Reach", "consumer_map", "data_nodes", "merge_reach", "residual_norms", "last_norm"]

# Ops a value passes through on its way to the nonlinearity that consumes it.
_THROUGH_MODULES = tuple(
    getattr(mod, n) for mod, names in (
        (nn.modules.pooling, ("_MaxPoolNd", "_AvgPoolNd", "_AdaptiveAvgPoolNd", "_AdaptiveMaxPoolNd", "_LPPoolNd")),
        (nn.modules.padding, ("_ConstantPadNd", "_ReflectionPadNd", "_ReplicationPadNd", "_CircularPadNd")),
    ) for n in names if hasattr(mod, n)
) + (*NORM_TYPES, *DROPOUT_MODULES, nn.LocalResponseNorm, nn.Identity, nn.Flatten, nn.Unflatten, nn.Upsample,
     nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
_THROUGH_FUNCTIONS = set(NORM_FUNCTIONS) | DROPOUT_FUNCTIONS | {
    operator.getitem, operator.add, operator.iadd, operator.sub, operator.neg, torch.add, torch.sub, torch.cat,
    torch.concat, torch.stack, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose,
    torch.permute, torch.chunk, torch.split, torch.mean, F.pad, F.interpolate, F.pixel_shuffle,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}
_THROUGH_METHODS = VIEW_METHODS | {"mean", "add", "add_", "sub", "sub_", "chunk", "split", "neg"}
_SCALE = {operator.mul, operator.truediv, torch.mul, torch.div, "mul", "mul_", "div", "div_"}
_IGNORED = {getattr, "size", "dim", "numel"}  # reading a shape consumes no values
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}


# -- the consumer map: which nonlinearity each value reaches --------------------------------
class Activation(NamedTuple):
    """A nonlinearity a value reaches: its place in the graph, name, arguments, qualified name."""

    order: int
    name: str
    kwargs: dict
    where: str


class Reach(NamedTuple):
    """What a value reaches: the earliest activation (or None), why some path leaves the visible
    graph (or None), and whether it is a model output."""

    activation: Activation | None
    unknown: str | None
    output: bool


def consumer_map(gm: fx.GraphModule, prefix: str = "") -> dict[fx.Node, Reach]:
    """For every node, the :class:`Reach` of its value, in one reverse pass.

    Args:
        gm: one traced region.
        prefix: the region's qualified name ("" at the root): a graph output of an inner region
            leaves into opaque code, and activations are named model-level.

    Returns:
        Per node, a :class:`Reach`.

    Example:
        >>> consumer_map(gm)[conv_node].activation.name
        'ReLU'
    """
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    reach: dict[fx.Node, Reach] = {}
    for node in reversed(nodes):
        found = []
        for user in node.users:
            role, info = _role(user, node, gm, prefix)
            if role == "act":
                found.append(Reach(Activation(order[user], *info), None, False))
            elif role == "through":
                found.append(reach[user])
            elif role in ("output", "unknown"):
                found.append(Reach(None, info, role == "output"))
        reach[node] = merge_reach(found)
    return reach


def _role(user: fx.Node, node: fx.Node, gm: fx.GraphModule, prefix: str) -> tuple[str, object]:
    """What ``user`` does with ``node``'s value: act, through, output, unknown or stop/ignore."""
    if user.op == "output":
        if node.meta.get("gt_model_output") or not prefix:
            return "output", None
        return "unknown", f"leaves region {prefix} into opaque code"
    act = activation_name(user, gm)
    if act is not None:
        return "act", (act, node_activation_kwargs(user, gm), node_where(prefix, user))
    target = user.target
    if user.op == "call_module":
        module = submodule(gm, str(target))
        if not is_builtin_module(module):
            return _opaque_role(module, f"{prefix}.{target}" if prefix else str(target))
        return ("through", None) if isinstance(module, _THROUGH_MODULES) else ("stop", None)
    if target in _IGNORED:
        return "ignore", None
    if (user.op == "call_function" and target in _THROUGH_FUNCTIONS) or (
        user.op == "call_method" and target in _THROUGH_METHODS
    ):
        return "through", None
    if target in _SCALE and len([a for a in user.all_input_nodes if a.op != "get_attr"]) == 1:
        return "through", None  # scaling by a constant or a parameter (layer scale)
    return "stop", None  # a linear consumer: another layer, matmul, softmax, attention, …


def merge_reach(found: list[Reach]) -> Reach:
    """Combine reaches: the earliest activation, the first unknown path, any output."""
    found = [Reach(*f) for f in found]  # plain tuples too
    acts = [f.activation for f in found if f.activation is not None]
    unknown = next((f.unknown for f in found if f.unknown is not None), None)
    earliest = Activation(*min(acts, key=lambda a: a[0])) if acts else None
    return Reach(earliest, unknown, any(f.output for f in found))


def _opaque_role(module: nn.Module, where: str) -> tuple[str, object]:
    """What an opaque module does with its input, where that can be told without its graph."""
    if isinstance(module, NORM_TYPES):  # a norm with a fused activation (timm BatchNormAct2d)
        for name, child in module.named_children():
            if type(child) in ACTIVATION_MODULES:
                act = ACTIVATION_MODULES[type(child)]
                return "act", (act, module_activation_kwargs(child), f"{where}.{name}")
        return "through", None
    if next(module.parameters(), None) is None and next(module.children(), None) is None:
        return "through", None  # parameter-free and childless: DropPath, StochasticDepth
    return "unknown", f"feeds opaque {type(module).__name__} at {where}"


# -- data: which values depend on the model's inputs -----------------------------------------
def data_nodes(gm: fx.GraphModule, data_inputs: set[str] | None = None) -> set[fx.Node]:
    """The nodes whose value depends on the region's data inputs, in one forward pass.

    A value computed only from parameters, buffers, constants and the inputs' shapes
    (``sigmoid(self.alpha)``, an MLP on a coordinates table, positions from ``x.size(1)``) is no data.

    Args:
        gm: one traced region.
        data_inputs: the names of the placeholders that carry data; None = all of them (the
            root region, or a region whose callers are unknown).

    Example:
        >>> gate = next(n for n in gm.graph.nodes if n.name == "sigmoid")
        >>> gate in data_nodes(gm)  # sigmoid(self.alpha)
        False
    """
    found: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if data_inputs is None or node.target in data_inputs:
                found.add(node)
        elif node.target not in _IGNORED and any(a in found for a in node.all_input_nodes):
            found.add(node)  # reading a shape is not reading the data
    return found


# -- residual branches ---------------------------------------------------------------------
def _is_norm(node: fx.Node, gm: fx.GraphModule) -> nn.Module | None:
    """The norm module an activation-free norm node applies, or None."""
    if node.op == "call_module":
        module = submodule(gm, str(node.target))
        if isinstance(module, NORM_TYPES) and (is_builtin_module(module) or _opaque_role(module, "")[0] == "through"):
            return module
    elif node.op == "call_function" and node.target in NORM_FUNCTIONS:
        for arg in node.all_input_nodes:
            owner, _, attr = str(arg.target).rpartition(".")
            if arg.op == "get_attr" and attr == "weight" and arg is not node.args[0]:
                return submodule(gm, owner)
    return None


def _norm_behind(node: fx.Node, gm: fx.GraphModule) -> nn.Module | None:
    """The norm whose output reaches ``node`` through activation-free, value-preserving ops."""
    while True:
        norm = _is_norm(node, gm)
        if norm is not None:
            return norm
        data = [a for a in node.all_input_nodes if a.op != "get_attr"]  # layer scale: a parameter
        if len(data) != 1:
            return None
        module = submodule(gm, str(node.target)) if node.op == "call_module" else None
        steps = (
            is_dropout(node, gm)
            or (module is not None and (isinstance(module, (nn.Identity, nn.Flatten, nn.Unflatten))
                                        or (not is_builtin_module(module) and _opaque_role(module, "")[0] == "through")))
            or (node.op == "call_method" and node.target in VIEW_METHODS)
            or (node.op != "call_module" and node.target in _SCALE)
        )
        if not steps:
            return None
        node = data[0]


def _is_act(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True when ``node`` applies a nonlinearity (an opaque module's told by its type)."""
    if node.op == "call_module" and not is_builtin_module(submodule(gm, str(node.target))):
        return _opaque_role(submodule(gm, str(node.target)), "")[0] == "act"
    return activation_name(node, gm) is not None


def residual_norms(gm: fx.GraphModule) -> list[tuple[nn.Module | None, nn.Module | None, str]]:
    """(last norm, residual-pass wrapper or None, where) of each residual sum ``F(x) + S(x)``.

    A sum the residual pass added is one by construction (its branch is ``args[0]``); any
    other add is one when an operand's own path (not shared with the other) holds a
    nonlinearity and ends, activation-free, in a norm.

    Example:
        >>> [where for _, _, where in residual_norms(gm)]  # torchvision resnet18
        ['layer1.0.add', 'layer1.1.add', ...]
    """
    out = []
    wrapped = {w for w, kind in (getattr(gm, REGISTRY, None) or {}).items() if kind == "block"}
    for node in gm.graph.nodes:
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if node.target not in _ADDS or node.op not in ("call_function", "call_method") or len(operands) != 2:
            continue
        at = _wrapper_of(node, wrapped)
        if at is not None:
            out.append((_norm_behind(operands[0], gm), submodule(gm, at), at))
            continue
        behind: dict[fx.Node, set] = {}  # each operand's ancestors, computed once
        for branch, shortcut in (operands, operands[::-1]):
            norm = _norm_behind(branch, gm)
            if norm is None:
                continue
            for a in operands:
                behind[a] = behind.get(a) or ancestors(a)
            own = behind[branch] - behind[shortcut]
            side = behind[shortcut] - behind[branch]
            if behind[branch] & behind[shortcut] and any(_is_act(n, gm) for n in own) and not any(
                _is_act(n, gm) for n in side
            ):
                out.append((norm, None, node.name))
    return out


def _wrapper_of(add: fx.Node, wrapped: set[str]) -> str | None:
    """The path of the residual-pass wrapper whose sum ``add`` is (from its module stack, or, in
    a graph captured again, from the wrapped blocks the graph lists), or None."""
    stack = list((add.meta.get("nn_module_stack") or {}).values())
    if stack and isinstance(stack[-1][1], type) and issubclass(stack[-1][1], (Residual, ResidualSpan)):
        return stack[-1][0]
    branch = add.args[0]
    path = str(branch.target) if branch.op == "call_module" else owner_path(branch)
    return next((w for w in wrapped if path.startswith(f"{w}.body")), None)


def last_norm(body: nn.Module) -> nn.Module | None:
    """The norm a wrapped body ends in, activation-free (its graph, or a Sequential's children)."""
    if isinstance(body, fx.GraphModule):
        out = next(n for n in reversed(body.graph.nodes) if n.op == "output").args[0]
        return _norm_behind(out, body) if isinstance(out, fx.Node) else None
    for child in reversed(list(body.children()) if isinstance(body, nn.Sequential) else [body]):
        if isinstance(child, NORM_TYPES):
            return child
        if not isinstance(child, (nn.Identity, *DROPOUT_MODULES)):
            return None
    return None
