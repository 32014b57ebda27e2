"""Re-specialise a regenerated forward whose guarded values changed: trace again, apply the same edits.

A module's regenerated forward is its traced code with the passes' edits (``fold.py``), specialised
on the attribute values the trace read (``flag_reads.py``); its guard (``fxgraph.adopt.Guard``)
notices when one changed and calls :func:`respecialise`, as torch.compile recompiles on a failed
guard. The module's own class forward is traced again with the values now (every submodule a leaf:
it is called as the module it is, with its own graph or forward), and every node the passes added
is put back at its place: after the node it followed, read by the nodes that read it.

A node is found in the new trace by what it does and what it reads, not by its name: its
operation and target, the identities of its inputs (found the same way), and how many such nodes
came before it; constants are left out, so a node whose constant changed (``x / self.temperature``)
is the same node. Where an edit cannot be placed that way (the node it followed is gone, a new
node reads a value some readers saw edited and others not, a pass changed or erased a node of the
module's own code), nothing is installed and the guard refuses in one line naming the value.
"""

from __future__ import annotations

import operator

import torch.fx as fx
from torch import nn

from graphtricks.capturing.guards import expect_equal, expect_none, expect_value, install_input_guards
from graphtricks.capturing.modes import ModeSnapshot
from graphtricks.capturing.tracing import mode_dependent_owners, one_line, restore_placeholder_names, trace_once
from graphtricks.fxgraph.adopt import adopt_graph, install_guard, original_class
from graphtricks.fxgraph.fastpath import speed_up

__all__ = ["ADDED", "respecialise"]

ADDED = "gt_added"  # node.meta key of the nodes of a module's graph that a pass added (set by fold)
_INPUT_GUARDS = (expect_equal, expect_none, expect_value)


class _CannotReplay(Exception):
    pass


def respecialise(module: nn.Module, guard) -> str | None:
    """Give ``module`` a graph traced again from its class's forward with its values now, carrying the
    nodes the passes added to the graph it runs, and a guard of the values this trace read.

    Returns:
        None when the new graph is installed; otherwise why it cannot be (the module is unchanged).
    """
    lossy = guard.context.get("lossy")
    if lossy:
        return f"a pass {lossy}, which cannot be applied again"
    edited = module.graph
    try:
        graph, reads = _trace_again(module, guard.context.get("concrete"), edited)
        _replay(edited, graph)
        graph.lint()
    except _CannotReplay as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - the module's own code under tracing, whatever it raises
        return f"tracing its forward again failed ({one_line(e)})"
    new_guard = install_guard(module, reads, respecialise, guard.context)
    adopt_graph(module, graph)
    speed_up(module)
    if new_guard is not None and new_guard.now(module) != new_guard.expected:
        return "its values changed while it was traced again"
    return None


def _concrete(edited: fx.Graph) -> dict:
    """The arguments the graph was specialised on, read back from its input guards."""
    out = {}
    for node in edited.nodes:
        if node.op == "call_function" and node.target is expect_none:
            out[node.args[1]] = None
        elif node.op == "call_function" and node.target is expect_equal:
            out[node.args[1]] = node.args[2]
    return out


def _trace_again(module: nn.Module, concrete: dict | None, edited: fx.Graph) -> tuple[fx.Graph, list]:
    """Trace ``module``'s class forward (children as leaves) in its mode; refuse a mode-dependent one."""
    concrete = dict(_concrete(edited) if concrete is None else concrete)
    leaves = {id(m) for m in module.modules() if m is not module}
    cls, snapshot = type(module), ModeSnapshot(module)
    module.__class__ = original_class(module)  # its own forward, not the graph's
    try:
        graphs = []
        for training in (module.training, not module.training):
            graph, failure, reads_training, writes = trace_once(module, leaves, concrete, training)
            if failure:
                raise failure[1]
            if writes:
                raise _CannotReplay("its forward now updates state a graph would drop")
            graphs.append(graph)
            if not reads_training:
                break
        # A forward that now depends on the mode (``F.dropout(x, self.drop_rate, self.training)``):
        # this graph is the current mode's, and the mode is guarded too (a switch re-specialises).
        by_mode = len(graphs) == 2 and bool(mode_dependent_owners(*graphs))
    finally:
        module.__class__ = cls
        snapshot.restore()
    graph = graphs[0]
    restore_placeholder_names(graph, module)
    install_input_guards(graph)
    _copy_input_guards(edited, graph)
    reads = [(m, name, value) for reader, m, name, value in getattr(graph, "_gt_reads", []) if not reader]
    if by_mode:
        reads.append((module, "training", module.training))
    graph.__dict__.pop("_gt_reads", None)
    graph.__dict__.pop("_gt_calls", None)
    return graph, reads


def _copy_input_guards(edited: fx.Graph, graph: fx.Graph) -> None:
    """The guards of arguments the edited graph had (fold's ``expect_equal``/``expect_value``)."""
    have = {(n.target, n.args[1]) for n in graph.nodes if n.op == "call_function" and n.target in _INPUT_GUARDS}
    placeholders = {str(n.target): n for n in graph.find_nodes(op="placeholder")}
    last = list(placeholders.values())[-1] if placeholders else None
    for node in edited.nodes:
        if node.op != "call_function" or node.target not in _INPUT_GUARDS or (node.target, node.args[1]) in have:
            continue
        ph = placeholders.get(str(node.args[0].target)) if isinstance(node.args[0], fx.Node) else None
        if ph is None:
            raise _CannotReplay(f"its input {node.args[1]!r} is gone")
        with graph.inserting_after(last):
            new = graph.call_function(node.target, (ph, *node.args[1:]))
        new.meta["is_wrapped"] = True
        last = new


def _keys(graph: fx.Graph, through=None) -> dict[fx.Node, tuple]:
    """Each node's identity: operation, target, its inputs' identities (constants left out, but for
    indexing), and how many nodes of that identity came before. ``through(node)``: the node an added
    node stands for (its identity is that node's)."""
    keys: dict[fx.Node, tuple] = {}
    seen: dict[tuple, int] = {}

    def arg_key(a):
        if isinstance(a, fx.Node):
            while through is not None and a.meta.get(ADDED):
                a = through(a)
            return keys[a]
        if isinstance(a, (tuple, list)):
            return tuple(arg_key(x) for x in a)
        if isinstance(a, dict):
            return tuple((k, arg_key(x)) for k, x in a.items())
        return "<constant>"

    for node in graph.nodes:
        if node.meta.get(ADDED) and through is not None:
            continue
        if node.op in ("placeholder", "get_attr", "call_module", "output"):
            base = (node.op, str(node.target))
        else:
            index = node.args[1:] if node.target is operator.getitem and len(node.args) == 2 else ()
            base = (node.op, getattr(node.target, "__name__", str(node.target)), arg_key((node.args, node.kwargs)),
                    repr(index) if index else "")
        n = seen.get(base, 0)
        seen[base] = n + 1
        keys[node] = (base, n)
    return keys


def _followed(node: fx.Node) -> fx.Node:
    """The node an added node was put after: its first input."""
    inputs = node.all_input_nodes
    if not inputs:
        raise _CannotReplay(f"the added node {node.name} reads no value")
    return inputs[0]


def _replay(edited: fx.Graph, graph: fx.Graph) -> None:
    """Add to ``graph`` (a new trace) the nodes a pass added to ``edited``, read as they were read."""
    old_keys = _keys(edited, _followed)
    new_nodes = {key: node for node, key in _keys(graph).items()}
    order = {n: i for i, n in enumerate(graph.nodes)}
    copies: dict[fx.Node, fx.Node] = {}

    def counterpart(node: fx.Node) -> fx.Node:
        if node.meta.get(ADDED):
            return copies[node]
        found = new_nodes.get(old_keys[node])
        if found is None:
            raise _CannotReplay(f"{node.name}, which an edit follows or reads, is not computed now")
        return found

    for node in edited.nodes:
        if not node.meta.get(ADDED):
            continue
        inputs = [counterpart(a) for a in node.all_input_nodes]
        after = max(inputs, key=lambda n: order[n], default=None)
        with graph.inserting_after(after) if after is not None else graph.inserting_before(None):
            new = graph.node_copy(node, lambda a: copies[a] if a.meta.get(ADDED) else counterpart(a))
        order[new] = order[after] + 0.5 if after is not None else -1
        copies[node] = new
    for node in edited.nodes:  # readers of an edited value read the edit, as they did
        if node.meta.get(ADDED):
            continue
        for a in node.all_input_nodes:
            if a.meta.get(ADDED):
                anchor = a
                while anchor.meta.get(ADDED):
                    anchor = _followed(anchor)
                reader, was = new_nodes.get(old_keys[node]), counterpart(anchor)
                if reader is None or was not in reader.all_input_nodes:
                    continue  # that reader is gone, or reads other values now; new readers are rerouted below
                reader.replace_input_with(was, copies[a])
    matched = {new_nodes[k] for n, k in old_keys.items() if k in new_nodes}
    _new_readers(copies, counterpart, matched)


def _new_readers(copies: dict, counterpart, matched: set) -> None:
    """Nodes of the new trace that read an edited value and have no counterpart in the edited graph:
    they read the edit when every reader of that value did, and the edit is one node."""
    for node, copy in copies.items():
        anchor = _followed(node)
        if anchor.meta.get(ADDED):
            continue
        was = counterpart(anchor)
        for user in list(was.users):
            if user in matched or user in copies.values():
                continue  # a counterpart: rewired above (or left as it read) / an edit itself
            if any(not u.meta.get(ADDED) for u in anchor.users):
                raise _CannotReplay(f"a new node reads {anchor.name}, which some readers saw edited and some not")
            if sum(1 for u in anchor.users) != 1:
                raise _CannotReplay(f"a new node reads {anchor.name}, which more than one edit follows")
            user.replace_input_with(was, copy)
