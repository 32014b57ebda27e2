"""Input guards of traced regions: what a graph was specialised on, checked at call time.

fx specialises an argument given as ``None`` with its own ``_assert_is_none`` guard. Once a
GraphModule holding that guard is unpickled, every later ``symbolic_trace`` in the process
fails (``KeyError: 'torch.fx._symbolic_trace._assert_is_none'``: the unpickled code registers
the guard under a dotted name that fx's patcher cannot find). graphtricks puts its own guards
in instead, wrapped with ``torch.fx.wrap`` so fx records them as calls (never traces into
them) and registers them under a plain global name that survives pickling and re-tracing.

A tensor argument whose default is ``None`` (``mask=None``, given a mask in the example) gets
a guard too: a graph traced with a tensor there cannot take ``None``, and without the guard
the call fails deep inside with an unrelated message.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphtricks.errors import InputShapeError

__all__ = ["expect_equal", "expect_none", "expect_value", "install_input_guards"]


@torch.fx.wrap
def expect_none(value, name: str) -> None:
    """Raise a one-line error when an input the graph was specialised on as None is given."""
    if value is not None:
        raise InputShapeError(f"input {name!r} was None when this model was rewritten, and its graph is specialised"
                              f" on that: call it without {name}, or rewrite it with an example that passes {name}")


@torch.fx.wrap
def expect_value(value, name: str) -> None:
    """Raise a one-line error when an input the graph was traced with is left out (None)."""
    if value is None:
        raise InputShapeError(f"input {name!r} is missing: this model was rewritten with {name} given, and its graph"
                              f" needs it; pass {name}, or rewrite it with an example that leaves {name} out")


@torch.fx.wrap
def expect_equal(value, name: str, expected) -> None:
    """Raise a one-line error when an input the graph was specialised on is given another value."""
    if type(value) is not type(expected) or value != expected:
        raise InputShapeError(f"input {name!r} was {expected!r} when this model was rewritten, and its graph is"
                              f" specialised on that: got {value!r:.60}; rewrite it with an example that passes it")


def _guard(graph: fx.Graph, after: fx.Node, value: fx.Node, fn, name: str) -> fx.Node:
    with graph.inserting_after(after):
        node = graph.call_function(fn, (value, name))
    # fx writes ``wrap("<global name>")`` into the code of nodes marked so: an unpickled copy,
    # re-traced from that code, then records the guard as a call again.
    node.meta["is_wrapped"] = True
    return node


def install_input_guards(graph: fx.Graph) -> list[str]:
    """Replace fx's ``_assert_is_none`` guards by :func:`expect_none`; guard optional tensors.

    Returns:
        The names of the inputs the graph was specialised on as None.
    """
    none_inputs = []
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in list(graph.nodes):
        if node.op == "call_function" and getattr(node.target, "__name__", "") == "_assert_is_none":
            ph, message = node.args[0], str(node.args[1])
            name = message.split(" has been specialized")[0]  # fx's message starts with the argument's name
            _guard(graph, node, ph, expect_none, name)
            graph.erase_node(node)
            none_inputs.append(name)
    last = placeholders[-1] if placeholders else None
    for node in placeholders:
        if not node.args or node.args[0] is not None or not node.users:
            continue
        if any(u.op == "call_function" and u.target is expect_none for u in node.users):
            continue
        last = _guard(graph, last, node, expect_value, str(node.target))
    return none_inputs
