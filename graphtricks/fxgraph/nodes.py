"""Graph helpers shared by passes, written once: names, module stacks, dataflow, insertion.

Everything here works on one traced region (a ``GraphModule`` and its graph) and knows no pass:
passes phrase their own errors from what these helpers return.
"""

from __future__ import annotations

import itertools
import re

import torch.fx as fx
from torch import nn

from graphtricks.fxgraph.activations import ACTIVATION_FUNCTIONS
from graphtricks.fxgraph.kinds import (
    DROPOUT_FUNCTIONS,
    DROPOUT_MODULES,
    PASS_THROUGH_FUNCTIONS,
    PASS_THROUGH_MODULES,
    VIEW_METHODS,
)
from graphtricks.fxgraph.lookup import submodule

__all__ = [
    "owner_path",
    "node_where",
    "unique_attr_name",
    "find_submodule",
    "name_glob",
    "stack_types",
    "module_nodes",
    "outer_stack",
    "boundary",
    "nodes_between",
    "ancestors",
    "insert_module_after",
    "feeds_model_output",
    "is_dropout",
    "mutates_input",
]

# In-place operators by ``__name__`` (``x += y`` traces to ``operator.iadd``, ``x[i] = v`` to setitem).
_INPLACE_OPERATORS = {"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor", "setitem"}


# -- names and ownership ----------------------------------------------------------------------
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
    parent = find_submodule(gm, parent_path) if parent_path else gm

    def taken(name: str) -> bool:
        # Checked name by name: collecting every child name per call made naming quadratic.
        if parent is None:
            return False
        return (name in parent._modules or name in parent._parameters or name in parent._buffers
                or name in vars(parent) or hasattr(type(parent), name))

    name, i = base, 0
    while taken(name):
        i += 1
        name = f"{base}_{i}"
    return f"{parent_path}.{name}" if parent_path else name


def find_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at ``path``, or None when there is none."""
    try:
        return submodule(root, path)
    except AttributeError:
        return None


def name_glob(pattern: str) -> re.Pattern:
    """A qualified-name glob matched by segment: ``*``/``?`` stop at dots, ``**`` crosses them.

    ``[abc]`` and ``[!abc]`` match one character, as in ``fnmatch``.

    Example:
        >>> bool(name_glob("stages.*").fullmatch("stages.1.0"))
        False
    """
    out, i = [], 0
    while i < len(pattern):
        end = pattern.find("]", i + 2) if pattern[i] == "[" else -1
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif end > 0:
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append({"*": r"[^.]*", "?": r"[^.]"}.get(pattern[i], re.escape(pattern[i])))
            i += 1
    return re.compile("".join(out))


# -- module stacks: which module's code computed a node ----------------------------------------
def stack_types(graph: fx.Graph) -> dict[str, type]:
    """Original module types by path, from the module stacks (a trace keeps containers as plain modules)."""
    stacks = (n.meta.get("nn_module_stack") or {} for n in graph.nodes)
    return {v[0]: v[1] for stack in stacks for v in stack.values() if isinstance(v[1], type)}


def module_nodes(graph: fx.Graph, path: str) -> list[fx.Node]:
    """Nodes a module (path relative to the graph's root) computes: a leaf's call, or an inlined module's nodes."""
    return [
        n for n in graph.nodes
        if n.op not in ("placeholder", "output")
        and ((n.op == "call_module" and n.target == path)
             or any(v[0] == path for v in (n.meta.get("nn_module_stack") or {}).values()))
    ]


def outer_stack(node: fx.Node, path: str) -> dict:
    """``node``'s module stack above ``path`` (the callers of the module at ``path``)."""
    stack = node.meta.get("nn_module_stack") or {}
    return dict(itertools.takewhile(lambda kv: kv[1][0] != path, stack.items()))


# -- dataflow ----------------------------------------------------------------------------------
def boundary(nodes: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """(entries, exits) of a set of nodes: the outside values they read (parameters aside), and
    those of them whose values are read outside."""
    inside = set(nodes)
    entries = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside and a.op != "get_attr"))
    exits = [n for n in nodes if n.op != "get_attr" and any(u not in inside for u in n.users)]
    return entries, exits


def nodes_between(graph: fx.Graph, first: fx.Node, last: fx.Node) -> list[fx.Node]:
    """The nodes from ``first`` on that ``last`` depends on (``last`` included), in graph order.

    ``first`` is among them only when ``last`` depends on it.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    seen, todo = set(), [last]
    while todo:
        n = todo.pop()
        if n not in seen and order[n] >= order[first] and n.op != "placeholder":
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return [n for n in graph.nodes if n in seen]


def ancestors(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node it depends on."""
    seen, todo = {node}, [node]
    while todo:
        for arg in todo.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                todo.append(arg)
    return seen


# -- insertion and outputs ---------------------------------------------------------------------
def insert_module_after(gm: fx.GraphModule, node: fx.Node, path: str, module: nn.Module) -> fx.Node:
    """Add ``module`` at ``path`` and route every user of ``node`` through it.

    The new node copies ``node``'s tensor metadata (callers insert shape-preserving modules), and
    its module stack is that of ``node``'s owner plus its own entry, so it belongs to the module
    whose code ``node`` is in (not to a leaf ``node`` calls).
    """
    gm.add_submodule(path, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(path, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    if "tensor_meta" in node.meta:
        new.meta["tensor_meta"] = node.meta["tensor_meta"]
    if "nn_module_stack" in node.meta:
        stack = list(node.meta["nn_module_stack"].items())
        if node.op == "call_module" and stack:
            stack = stack[:-1]  # a leaf call records the leaf itself last
        new.meta["nn_module_stack"] = {**dict(stack), path: (path, type(module))}
    return new


def _passes_through(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True when ``node`` only moves or views its input."""
    return _calls(node, gm, PASS_THROUGH_MODULES, PASS_THROUGH_FUNCTIONS, VIEW_METHODS)


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


# -- node kinds ------------------------------------------------------------------------------
def _calls(node: fx.Node, gm: fx.GraphModule, modules: tuple, functions: set, methods: frozenset | set = frozenset()) -> bool:
    """True when ``node`` calls a module of one of the types ``modules``, one of ``functions`` or ``methods``."""
    if node.op == "call_module":
        return isinstance(submodule(gm, node.target), modules)
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    return False


def is_dropout(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True when ``node`` applies dropout in any form."""
    return _calls(node, gm, DROPOUT_MODULES, DROPOUT_FUNCTIONS)


def mutates_input(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True when ``node`` writes into its first input (``inplace=True``, ``relu_``, ``+=``, ``x[i] = v``)."""
    if node.op == "call_module":
        return bool(getattr(submodule(gm, node.target), "inplace", False))
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    # A trailing positional True is ``inplace`` only for activations (``F.relu(x, True)``).
    positional = node.target in ACTIVATION_FUNCTIONS and len(node.args) > 1 and node.args[-1] is True
    trailing = name.endswith("_") and not name.endswith("__")
    return trailing or name in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True or positional
