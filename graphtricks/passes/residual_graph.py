"""Residual's graph surgery: a wrapper's sum written into a traced graph, and nodes moved into a wrapper.

``add_merge_nodes`` is the graph form of ``layers.residual._ResidualParts.merge`` (the two must
compute the same); ``retarget`` points the nodes of a block at its new place inside a wrapper.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

__all__ = ["add_merge_nodes", "retarget"]


def add_merge_nodes(gm: fx.GraphModule, entry, exit_, inside: set, path: str, parts: nn.Module, stack: dict) -> None:
    """The graph form of ``merge``: add ``act(exit + α·S(entry))`` after ``exit`` and route users through it.

    Args:
        gm: the graph module; ``parts`` (a :class:`Residual` or :class:`ResidualSpan`) is at ``path``.
        entry: the node whose value the shortcut reads (the block's input).
        exit_: the node whose value the shortcut is added to (the block's output).
        inside: the block's nodes, which keep reading ``exit_``.
        path: where ``parts`` sits in ``gm``.
        parts: the wrapper whose shortcut, gate and post-activation the nodes call.
        stack: the module stack the new nodes record (``nn_module_stack``).
    """
    graph, new = gm.graph, []
    # Add after the block's last node, not right after ``exit_``: an in-place statement that ends the
    # block (``y = fc(x); y.relu_(); return y``) must run before the sum reads ``y``.
    order = {n: i for i, n in enumerate(graph.nodes)}
    last = max((n for n in inside if n in order), key=order.__getitem__, default=exit_)
    early_reader = any(u not in inside and order.get(u, -1) <= order[last] for u in exit_.users)
    cur = last if order[last] > order[exit_] and not early_reader else exit_

    def add(op, target, args, *own):
        nonlocal cur
        with graph.inserting_after(cur):
            cur = graph.create_node(op, target, args)
        cur.meta["nn_module_stack"] = {**stack, **{p: (p, t) for p, t in own}}
        if op != "get_attr":
            cur.meta["tensor_meta"] = exit_.meta["tensor_meta"]
        new.append(cur)
        return cur

    s, short = entry, f"{path}.shortcut"
    if isinstance(parts.shortcut, nn.Sequential):  # one node per layer: later passes see the BatchNorm
        for i, sub in enumerate(parts.shortcut):
            s = add("call_module", f"{short}.{i}", (s,), (short, nn.Sequential), (f"{short}.{i}", type(sub)))
    elif not isinstance(parts.shortcut, nn.Identity):
        s = add("call_module", short, (s,), (short, type(parts.shortcut)))
    branch = exit_
    if parts.gate is not None and getattr(parts, "gate_on", "shortcut") == "branch":
        branch = add("call_function", operator.mul, (add("get_attr", f"{path}.gate", ()), exit_))
    elif parts.gate is not None:
        s = add("call_function", operator.mul, (add("get_attr", f"{path}.gate", ()), s))
    out = add("call_function", operator.add, (branch, s))
    if parts.post_act == "relu":
        out = add("call_function", torch.relu, (out,))
    exit_.replace_all_uses_with(out, delete_user_cb=lambda user: user not in inside and user not in new)
    if exit_.meta.pop("gt_model_output", None):
        out.meta["gt_model_output"] = True


def retarget(graph: fx.Graph, old: str, new: str, wrapper: type) -> None:
    """Point every node at module ``old`` (and below) to ``new``, a module moved into a ``wrapper`` at ``old``.

    Module stacks gain ``(old, wrapper)`` above the moved entries, so owners and names stay right.
    """

    def moved(path: str) -> str | None:
        return new + path[len(old) :] if path == old or path.startswith(old + ".") else None

    for n in graph.nodes:
        if n.op in ("call_module", "get_attr") and moved(str(n.target)):
            n.target = moved(str(n.target))
        stack = n.meta.get("nn_module_stack") or {}
        if any(moved(v[0]) for v in stack.values()):
            fresh = {}
            for key, value in stack.items():
                if moved(value[0]) is None:
                    fresh[key] = value
                    continue
                fresh.setdefault(old, (old, wrapper))
                fresh[moved(value[0])] = (moved(value[0]), *value[1:])
            n.meta["nn_module_stack"] = fresh
