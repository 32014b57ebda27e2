"""Fold a region's flat graph back into one graph per module, so every block stays a called module.

A traced region is one graph: fx inlines every module it goes through. Passes edit that flat
graph, because their analyses look across module boundaries (the nonlinearity a layer feeds, a
block's shapes). The model users get back must still be their model: :func:`fold_region` cuts
the edited flat graph back along the calls the trace went through (recorded by
:class:`~graphtricks.capturing.tracing.RegionTracer`), gives each module its own graph with its
children as calls (:func:`~graphtricks.fxgraph.adopt.adopt_graph`: same object, same class,
its hooks fire), and leaves the region root with a graph that calls its children.

A node belongs to the innermost module call in its ``nn_module_stack``; what passes add records
the stack of the module they add it to. A call is folded back only when its graph can be cut out
exactly: it received its inputs as arguments (nothing read from its caller's scope), each value
once, its result is a tensor or a tuple/list/dict of them, everything of it that its caller uses
is in that result, and every call of the same module folds to the same graph (or to graphs that
differ only in equal modules a pass added to each call: those are unified). A call that cannot
is left inlined in its caller's graph, as the flat graph had it, and named with the reason
(:attr:`Fold.inlined`): the computation is the same, but that module is not called (its hooks
do not fire, ``checkpoint(module)`` runs its original code).

A module whose own code no pass edited, the region root included, keeps its own forward. Each
module that runs a graph gets a guard of the attribute values its own code read while traced
(``flag_reads.py``), which re-specialises it when one changes (``respecialise.py``).
"""

from __future__ import annotations

import functools
import inspect
import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphtricks.capturing.guards import expect_equal, expect_none, expect_value
from graphtricks.capturing.hooks import hook_kinds
from graphtricks.capturing.respecialise import ADDED, respecialise
from graphtricks.capturing.tracing import InlinedCall, one_line
from graphtricks.fxgraph.adopt import (
    adopt_graph,
    adoption_conflict,
    adoption_snapshot,
    install_guard,
    is_adopted,
    original_class,
    release_graph,
)
from graphtricks.fxgraph.codecache import shared_compiles

__all__ = ["Fold", "flat_view", "fold_graph", "fold_region"]

_CONSTANTS = (type(None), bool, int, float, str)
_MAX_ROUNDS = 64


@dataclass
class Fold:
    """What folding one region did.

    Attributes:
        called: module paths (relative to the region) that are called modules with graphs of their own.
        inlined: module path -> why its calls stay inlined in its caller's graph.
        unified: module path of a module a pass added to one call of a module called more than once
            -> the equal module, added to its first call, that every call uses now (the other is removed).
    """

    called: list[str] = field(default_factory=list)
    inlined: dict[str, str] = field(default_factory=dict)
    unified: dict[str, str] = field(default_factory=dict)  # a module a pass added -> the equal one used instead


class _Unfoldable(Exception):
    def __init__(self, instance: _Instance, reason: str):
        super().__init__(reason)
        self.instance, self.reason = instance, reason


@dataclass(eq=False)
class _Instance:
    """One call of one module in the flat graph."""

    key: tuple[str, ...]
    path: str
    module: nn.Module | None
    call: InlinedCall | None = None
    parent: _Instance | None = None
    span: list[fx.Node] = field(default_factory=list)  # its nodes and its callees', in graph order
    reason: str | None = None  # why it stays inlined; None = folded
    added: bool = False  # a module a pass added (a wrapper): its one input and output read from the graph
    slots: dict[fx.Node, fx.Node] = field(default_factory=dict)  # result node -> what now stands for it
    given: dict[fx.Node, fx.Node] = field(default_factory=dict)  # argument node -> what now stands for it


def _chain(node: fx.Node) -> list[tuple[str, str]]:
    """(stack key, module path) of the calls ``node`` is inside, outermost first."""
    stack = list((node.meta.get("nn_module_stack") or {}).items())
    if node.op == "call_module" and stack and stack[-1][1][0] == node.target:
        stack = stack[:-1]  # a leaf records itself while its call is made: its caller owns the node
    return [(key, value[0]) for key, value in stack]


def _flatten(value) -> list:
    if isinstance(value, (tuple, list)):
        return [x for v in value for x in _flatten(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flatten(v)]
    return [value]


def _plain(value) -> bool:
    """Nodes and constants inside plain tuples, lists and dicts: what a graph can pass and return."""
    if isinstance(value, (fx.Node, *_CONSTANTS)):
        return True
    if type(value) in (tuple, list):
        return all(_plain(v) for v in value)
    if type(value) is dict:
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


class _Folder:
    def __init__(self, root: nn.Module, graph: fx.Graph, calls: dict[str, InlinedCall], captured: dict | None = None):
        self.graph, self.calls = graph, calls
        self.captured = captured or {}
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.modules = dict(root.named_modules(remove_duplicate=False))
        by_module: dict[int, list[InlinedCall]] = {}
        for call in calls.values():
            by_module.setdefault(id(call.module), []).append(call)
        self.by_module = by_module
        self.top = _Instance((), "", root)
        self.stand_in: dict[fx.Node, fx.Node] = {}  # a result a pass put a node after -> that node
        self.instances: dict[tuple[str, ...], _Instance] = {(): self.top}
        self.owner: dict[fx.Node, _Instance] = {}
        for node in graph.nodes:
            inst = self.top
            for key, path in (_chain(node) if node.op not in ("placeholder", "output") else ()):
                inst = self._instance(inst, key, path)
            self.owner[node] = inst
            walk = inst
            while walk is not None:
                walk.span.append(node)
                walk = walk.parent
        # Calls that added no node (an empty Sequential, a block that returns its input) are
        # called modules too: they are found from the calls around them.
        for call in calls.values():
            if not call.chain or self.modules.get(call.chain[-1][1]) is not call.module:
                continue  # moved by a pass (into a wrapper): its nodes say where it is now
            inst = self.top
            for key, path in call.chain:
                inst = self._instance(inst, key, path)
        # Calls with no node of their own, looked through at each graph made (usually none or few).
        self.empty = [i for i in self.instances.values() if not i.span and i is not self.top]
        # Captured nodes a pass erased, by the innermost call they were in.
        self.erased_in: list[_Instance] = []
        for node in self.captured:
            if node not in self.order:
                inst = self.top
                for key, _path in (_chain(node) if node.op not in ("placeholder", "output") else ()):
                    inst = self.instances.get((*inst.key, key), inst)
                self.erased_in.append(inst)

    # -- which calls keep their own forward -----------------------------------------------
    def unedited(self, inst: _Instance) -> bool:
        """True when no pass changed what ``inst``'s own code does: every node of its graph (outside
        the calls it makes) is as captured, none was erased, and it is no module a pass added.

        Such a module keeps its own forward: it computes what its graph would, calls its children
        as its graph would, and runs the Python the trace ran (so it stays right on inputs the
        trace would have specialised on). A node a pass put after a callee's result, standing in
        for it, counts as that result (the callee returns it now).
        """
        if inst.added or not self.captured:
            return False
        back = self._results_back
        for node in inst.span:
            if self.called_below(node, inst) is not None:
                continue  # inside a call it makes: that module's own concern
            was = self.captured.get(node)
            if was is None:
                return False
            target, args, kwargs = was
            if node.target != target:
                return False
            for now, then in ((node.args, args), (node.kwargs, kwargs)):
                if now is not then and not _same(fx.node.map_arg(now, lambda a: back.get(a, a)), then):
                    return False
        for owner in self.erased_in:
            if self._level(owner, inst):
                return False
        return True

    def replay_obstacle(self, inst: _Instance) -> str | None:
        """What a pass did to ``inst``'s own code that re-specialising cannot do again (it adds nodes
        after others and reroutes their readers; it does not change or erase a node), or None."""
        if inst.added:
            return "added this module"
        for node in inst.span:
            if self.called_below(node, inst) is not None or node not in self.captured:
                continue
            target, args, kwargs = self.captured[node]
            if node.target != target:
                return f"changed what {node.name} calls"
            if _constants(node.args, node.kwargs) != _constants(args, kwargs):
                return f"changed an argument of {node.name}"
        if any(self._level(owner, inst) for owner in self.erased_in):
            return "erased a node of its code"
        return None

    @functools.cached_property
    def _results_back(self) -> dict[fx.Node, fx.Node]:
        """The node that now stands for each callee result a pass put a node after -> that result
        (``stand_in`` is complete once every call was checked, before any graph is made)."""
        back = {}
        for result in self.stand_in:
            node = result
            while node in self.stand_in:
                node = self.stand_in[node]
            back[node] = result
        return back

    def _level(self, owner: _Instance, inst: _Instance) -> bool:
        """True when a node of ``owner`` is part of ``inst``'s own graph (no folded call between them)."""
        walk = owner
        while walk is not None and walk is not inst:
            if walk.reason is None:
                return False
            walk = walk.parent
        return walk is inst

    def _instance(self, parent: _Instance, key: str, path: str) -> _Instance:
        chain = (*parent.key, key)
        found = self.instances.get(chain)
        if found is None:
            module = self.modules.get(path)
            call = self.calls.get(key)
            if call is None or call.module is not module:
                # Renamed by a pass (a block moved into a wrapper): the same module's only call.
                calls = self.by_module.get(id(module), [])
                call = calls[0] if len(calls) == 1 else None
            found = _Instance(chain, path, module, call, parent)
            self.instances[chain] = found
        return found

    # -- which calls fold ----------------------------------------------------------------
    def check(self, inst: _Instance) -> str | None:
        """Why ``inst`` cannot be cut out of its caller's graph, or None."""
        if inst.module is None:
            return "its module is no longer in the model"
        conflict = adoption_conflict(inst.module)
        if conflict:
            return conflict
        inside = set(inst.span)
        if not inside:
            if inst.call is None:
                return "it adds no node of its own"
            given = {v for v in _flatten((inst.call.args, inst.call.kwargs)) if isinstance(v, fx.Node)}
            if not _plain(inst.call.result) or not _plain((inst.call.args, inst.call.kwargs)):
                return "it takes or returns values that are not tensors, constants or tuples of them"
            if not {v for v in _flatten(inst.call.result) if isinstance(v, fx.Node)} <= given:
                return "it returns values it does not compute"
            # What it is given may be a result a pass put a node after (its caller reads that node).
            inst.given = {g: self.stand_in.get(g, g) for g in given}
            return None  # it returns (some of) its inputs: called for its hooks, its result is theirs
        if inst.call is not None:
            args, kwargs, result = inst.call.args, inst.call.kwargs, inst.call.result
            if not (_plain(args) and _plain(kwargs)):
                return "it takes arguments that are not tensors, constants or tuples of them"
            if not _plain(result):
                return f"it returns a {type(result).__name__}, not a tensor or a tuple of them"
            given = [v for v in _flatten((args, kwargs)) if isinstance(v, fx.Node)]
            if len(set(given)) != len(given):
                return "it is given the same value in two arguments"
            returned = [v for v in _flatten(result) if isinstance(v, fx.Node)]
        else:  # added by a pass (a wrapper): one input, one output, read from the graph
            given, returned = None, None
        reads = {a for n in inst.span for a in n.all_input_nodes if a not in inside}
        escaping = [n for n in inst.span if any(u not in inside for u in n.users)]
        if given is None:
            if len(reads) != 1 or len(escaping) != 1:
                return "a module added by a pass whose graph has more than one input or output"
            given, returned = list(reads), escaping
            inst.added = True
        # A node a pass put after an argument (dropout after the previous block's last activation)
        # is what the call is given now, when nothing inside reads the argument itself any more.
        subst = {g: g for g in given}
        for node in reads:
            if node in subst:
                continue
            replaced = _nearest(node, [g for g in subst if subst[g] is g and not any(u in inside for u in g.users)
                                       and _reaches(g, node)])
            if len(replaced) != 1:
                return "it reads values of its caller that it is not given"
            subst[replaced[0]] = node
        inst.given = subst
        first = self.order[inst.span[0]]
        if any(self.order[g] > first for g in subst.values()):
            return "its nodes are interleaved with its caller's"
        # What its caller uses must be its result; a node a pass put after the result (dropout after
        # a block's last activation) takes the result's place when nothing uses the result any more.
        slots = {r: r for r in returned if r in inside}
        for node in escaping:
            if node in slots:
                continue
            replaced = _nearest(node, [r for r in slots if slots[r] is r and not any(u not in inside for u in r.users)
                                       and _reaches(r, node)])
            if len(replaced) != 1:
                return "its caller uses a value it does not return"
            slots[replaced[0]] = node
            self.stand_in[replaced[0]] = node
        inst.slots = slots
        if inst.call is None:
            inst.call = InlinedCall(inst.module, inst.key[-1], tuple(given), {}, returned[0])
        return None

    def called_below(self, node: fx.Node, inst: _Instance) -> _Instance | None:
        """The outermost folded call below ``inst`` that contains ``node``."""
        chain, found = [], self.owner[node]
        while found is not None and found is not inst:
            chain.append(found)
            found = found.parent
        if found is None:  # not inside ``inst`` at all
            return None
        for candidate in reversed(chain):
            if candidate.reason is None:
                return candidate
        return None

    # -- emitting one module's graph -------------------------------------------------------
    def relative(self, inst: _Instance, target: str) -> str:
        """``target`` (a path from the region root) as a path from ``inst``'s module."""
        if not inst.path:
            return target
        if target.startswith(inst.path + "."):
            return target[len(inst.path) + 1 :]
        # A shared module or parameter, named by fx after its first name: look for it below.
        owner_path, _, attr = target.rpartition(".")
        obj = self.modules.get(target)
        for name, module in inst.module.named_modules(remove_duplicate=False):
            if obj is not None and module is obj:
                return name
            if obj is None and module is self.modules.get(owner_path) and attr:
                return f"{name}.{attr}" if name else attr
        raise _Unfoldable(inst, f"it uses {target}, which is not one of its own submodules")

    def emit(self, inst: _Instance) -> fx.Graph:
        g = fx.Graph(tracer_cls=self.graph._tracer_cls)
        env: dict[fx.Node, Any] = {}
        if inst is self.top:
            g._codegen = self.graph._codegen
        else:
            self._placeholders(inst, g, env)
        done: set[int] = set()
        # Callees with no node of their own are called as soon as their arguments exist.
        waiting: dict[fx.Node | None, list[_Instance]] = {}
        for callee in self.empty:
            if callee.reason is None and callee is not inst and self._calls_from(callee, inst):
                args = [callee.given.get(a, a) for a in _flatten((callee.call.args, callee.call.kwargs))
                        if isinstance(a, fx.Node)]
                last = max(args, key=self.order.__getitem__, default=None)
                waiting.setdefault(last, []).append(callee)

        def flush():
            for callee in [c for a in list(waiting) if a is None or a in env for c in waiting.pop(a)]:
                self._emit_call(inst, callee, g, env, bind=False)

        flush()
        for node in inst.span if inst is not self.top else self.graph.nodes:
            callee = self.called_below(node, inst)
            if callee is not None:
                if id(callee) not in done:
                    done.add(id(callee))
                    self._emit_call(inst, callee, g, env)
                    flush()
                continue
            if node.op == "placeholder" and inst is not self.top:
                continue
            if node.op == "output":
                g.output(fx.node.map_arg(node.args[0], lambda a: self._get(env, inst, a)))
                continue
            new = g.node_copy(node, lambda a: self._get(env, inst, a))
            if self.captured and node not in self.captured:
                new.meta[ADDED] = True  # a pass's node: calls of one module may differ only in these
            if node.op in ("call_module", "get_attr"):
                new.target = self.relative(inst, str(node.target))
            new._rename(_local_name(node, inst.path))
            env[node] = new
            if waiting:
                flush()
        if inst is not self.top:
            result = _map(inst.call.result, lambda r: self._get(env, inst, inst.slots.get(r, r)))
            g.output(result)
        g.lint()
        return g

    def _get(self, env: dict, inst: _Instance, node: fx.Node):
        while node not in env and node in self.stand_in:  # a pass routed every reader through a later node
            node = self.stand_in[node]
        if node not in env:
            # Made inside a call this graph makes, which does not return it: that call stays inlined.
            callee = self.called_below(node, inst) if node in self.owner else None
            if callee is not None:
                raise _Unfoldable(callee, f"its caller reads {node.name}, which it does not return")
            raise _Unfoldable(inst, f"value {node.name} is used before its caller has it")
        return env[node]

    def _placeholders(self, inst: _Instance, g: fx.Graph, env: dict) -> None:
        """The module's forward parameters as placeholders, each bound to what this call passed.

        Parameters the call passed a constant (or None) are guarded: the graph is specialised on
        them, and a later call with another value fails with a one-line error instead of being
        ignored.
        """
        params, signature = _forward_signature(original_class(inst.module))
        if inst.added:  # a pass's wrapper: its one input goes to the first parameter
            if not params or any(p.default is p.empty for p in params[1:]):
                raise _Unfoldable(inst, "a module added by a pass with a forward of more than one input")
            values = {params[0].name: inst.call.args[0]}
        else:
            try:
                values = signature.bind(*inst.call.args, **inst.call.kwargs).arguments
            except TypeError as e:
                raise _Unfoldable(inst, f"its call does not fit its forward: {e}") from e
        guards = []
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                if values.get(p.name):
                    raise _Unfoldable(inst, f"it is given *args/**kwargs ({p.name})")
                continue
            given = _map(values.get(p.name, None if p.default is p.empty else p.default), lambda a: inst.given.get(a, a))
            ph = g.placeholder(p.name, default_value=p.default)
            _bind(g, ph, given, env)
            if given is None:
                guards.append((expect_none, ph, p.name))
            elif isinstance(given, fx.Node) and p.default is None:
                guards.append((expect_value, ph, p.name))
            elif isinstance(given, _CONSTANTS):
                guards.append((expect_equal, ph, p.name, given))
            elif not isinstance(given, fx.Node):  # a tuple or dict: its constants are specialised on
                if any(not isinstance(x, fx.Node) for x in _flatten(given)):
                    raise _Unfoldable(inst, f"it is given a {type(given).__name__} of tensors and constants ({p.name})")
        for fn, ph, *rest in guards:
            node = g.call_function(fn, (ph, *rest))
            node.meta["is_wrapped"] = True  # fx writes wrap("name") into the code: it survives pickling

    def _calls_from(self, callee: _Instance, inst: _Instance) -> bool:
        """True when ``inst``'s graph makes ``callee``'s call (every call between them is inlined)."""
        walk = callee.parent
        while walk is not None and walk is not inst:
            if walk.reason is None:
                return False
            walk = walk.parent
        return walk is inst

    def _emit_call(self, inst: _Instance, callee: _Instance, g: fx.Graph, env: dict, bind: bool = True) -> None:
        target = self.relative(inst, callee.path) if callee.path else ""
        if not target:
            raise _Unfoldable(callee, "it is the region itself")
        args = _map(callee.call.args, lambda a: self._get(env, inst, callee.given.get(a, a)))
        kwargs = _map(callee.call.kwargs, lambda a: self._get(env, inst, callee.given.get(a, a)))
        out = g.call_module(target, tuple(args), dict(kwargs))
        out._rename(target.replace(".", "_"))
        if bind:
            _bind(g, out, callee.call.result, env, callee.slots)


@functools.lru_cache(maxsize=1024)
def _forward_signature(cls: type) -> tuple[list[inspect.Parameter], inspect.Signature]:
    """The parameters of ``cls.forward`` after ``self``, and their signature (once per class)."""
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    return params, inspect.Signature(params)


def _map(value, fn):
    if isinstance(value, fx.Node):
        return fn(value)
    if type(value) in (tuple, list):
        return type(value)(_map(v, fn) for v in value)
    if type(value) is dict:
        return {k: _map(v, fn) for k, v in value.items()}
    return value


def _constants(*values) -> list:
    """The constants of node arguments, in order (nodes left out): what a pass may have changed."""
    out = []

    def walk(v):
        if isinstance(v, fx.Node):
            return
        if isinstance(v, (tuple, list)):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for k, x in v.items():
                out.append(k)
                walk(x)
        else:
            out.append(repr(v))

    walk(values)
    return out


def _same(a, b) -> bool:
    """``a`` and ``b`` are the same arguments: nodes and objects by identity, constants by value."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return isinstance(a, _CONSTANTS + (slice, range)) and a == b


def _same_meta(value: fx.Node, node: fx.Node) -> None:
    """Give ``value`` (standing for ``node`` in another graph) ``node``'s recorded shape."""
    if "tensor_meta" in node.meta and "tensor_meta" not in value.meta:
        value.meta["tensor_meta"] = node.meta["tensor_meta"]


def _bind(g: fx.Graph, value: fx.Node, structure, env: dict, slots: dict | None = None) -> None:
    """Map the nodes inside ``structure`` (a node, or tuple/list/dict of them) to ``value``'s parts.

    ``value`` is a placeholder (a call's argument) or a call's result in the new graph; its parts are
    taken with ``getitem``. ``slots`` says which flat node now stands for each result node.
    """
    if isinstance(structure, fx.Node):
        node = slots.get(structure, structure) if slots else structure
        env[node] = value
        _same_meta(value, node)
        return
    items = enumerate(structure) if type(structure) in (tuple, list) else structure.items() if type(structure) is dict else ()
    for key, part in items:
        if any(isinstance(x, fx.Node) for x in _flatten(part)):
            _bind(g, g.call_function(operator.getitem, (value, key)), part, env, slots)


def _nearest(node: fx.Node, candidates: list[fx.Node]) -> list[fx.Node]:
    """The candidates ``node`` reads directly, when several reach it (one leads to the other)."""
    if len(candidates) > 1:
        direct = [c for c in candidates if c in node.all_input_nodes]
        return direct or candidates
    return candidates


def _reaches(src: fx.Node, dst: fx.Node) -> bool:
    todo, seen = [dst], set()
    while todo:
        n = todo.pop()
        if n is src:
            return True
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return False


def _local_name(node: fx.Node, path: str) -> str:
    """A node name for a module's own graph: its target from the module, or its op's base name."""
    if node.op in ("call_module", "get_attr"):
        target = str(node.target)
        if path and target.startswith(path + "."):
            target = target[len(path) + 1 :]
        return target.replace(".", "_")
    return re.sub(r"_\d+$", "", node.name)


def _canonical(g: fx.Graph) -> list:
    """A graph's nodes by what they do, with node references as positions (names differ per call)."""
    index = {n: i for i, n in enumerate(g.nodes)}

    def norm(v):
        if isinstance(v, fx.Node):
            return ("%", index[v])
        if isinstance(v, (tuple, list)):
            return tuple(norm(x) for x in v)
        if isinstance(v, dict):
            return tuple((k, norm(x)) for k, x in v.items())
        return repr(v)

    return [(n.op, str(n.target), norm(n.args), norm(n.kwargs)) for n in g.nodes]


def fold_graph(
    root: nn.Module, graph: fx.Graph, calls: dict[str, InlinedCall], captured: dict | None = None,
    reads: list | tuple = (),
) -> tuple[fx.Graph | None, dict, Fold, dict]:
    """Cut ``graph`` (the flat graph of region ``root``) into one graph per called module.

    ``captured`` (node -> its target, args and kwargs when traced) tells which modules no pass
    edited: those keep their own forward and get no graph (:meth:`_Folder.unedited`), the region
    root included. A module called more than once folds when its calls got equal graphs, or
    graphs that differ only in equal modules a pass added to each call (one dropout per call of
    a block): those are unified into the first call's (:attr:`Fold.unified`). ``reads``
    (``(reader stack keys, module, name, value)``, ``flag_reads``) are given to the graph that
    holds the code that read them.

    Returns:
        ``(root_graph, graphs, fold, guards)``: the region root's new graph (None: it keeps its own
        forward), ``{id(module): (module, graph)}`` for every called module that runs a graph now,
        the report of what was folded and what stays inlined, and ``{id(module): (module,
        [(owner, name, value)])}`` for the values each graph was specialised on. Nothing is
        installed: :func:`install` does that.
    """
    folder = _Folder(root, graph, calls, captured)
    instances = [i for i in folder.instances.values() if i is not folder.top]
    for inst in sorted(instances, key=lambda i: not i.span):  # calls with nodes first: they say what stands in
        inst.reason = folder.check(inst)
    for _ in range(_MAX_ROUNDS):
        try:
            graphs: dict[int, tuple[nn.Module, fx.Graph, list]] = {}
            unified: dict[str, str] = {}
            edited = {id(i.module) for i in instances if i.reason is None and not folder.unedited(i)}
            for inst in instances:
                if inst.reason is not None or id(inst.module) not in edited:
                    continue  # inlined, or called as it is (its own forward)
                try:
                    g = folder.emit(inst)
                except _Unfoldable:
                    raise
                except Exception as e:  # noqa: BLE001 - a graph that does not check: that module stays inlined
                    raise _Unfoldable(inst, f"its own graph does not check ({type(e).__name__}: {one_line(e)})") from e
                seen = graphs.get(id(inst.module))
                if seen is None:
                    graphs[id(inst.module)] = (inst.module, g, _canonical(g))
                elif seen[2] != _canonical(g):
                    renamed = _unify(inst.module, seen[1], g)
                    if renamed is None:
                        raise _Unfoldable(inst, "its calls trace to different graphs (called with different"
                                                " arguments, or edited differently)")
                    unified.update({_join(inst.path, a): _join(inst.path, b) for a, b in renamed.items()})
            root_graph = folder.emit(folder.top)
            if folder.unedited(folder.top) and not _keyword_only(root):
                root_graph = None
            break
        except _Unfoldable as e:
            for inst in instances:  # every call of that module stays inlined
                if inst.module is e.instance.module and inst.reason is None:
                    inst.reason = e.reason
            if e.instance is folder.top:
                raise
    else:
        raise RuntimeError("folding did not settle")
    fold = Fold(unified=unified)
    for inst in instances:
        if inst.reason is None:
            if inst.path not in fold.called:
                fold.called.append(inst.path)
        else:
            fold.inlined.setdefault(inst.path, inst.reason)
    guards = _guarded_reads(folder, graphs, root_graph is not None, reads)
    for inst in [folder.top, *instances]:  # what stops each graph from being re-specialised
        if id(inst.module) in guards and (inst is folder.top or inst.reason is None):
            guards[id(inst.module)][2].setdefault("lossy", folder.replay_obstacle(inst))
    return root_graph, {k: (m, g) for k, (m, g, _) in graphs.items()}, fold, guards


def _keyword_only(module: nn.Module) -> bool:
    """True when ``module``'s forward has keyword-only parameters: its graph, which takes every input
    by position too, is kept (exporters feed inputs by position)."""
    params, _ = _forward_signature(original_class(module))
    return any(p.kind is p.KEYWORD_ONLY for p in params)


def _guarded_reads(folder: _Folder, graphs: dict, root_has_graph: bool, reads) -> dict[int, tuple]:
    """The values each regenerated forward was specialised on: a read belongs to the graph that holds
    the code that made it (the reader's call, or the call it is inlined in); a module that keeps its
    own forward reads its values again on each call and needs no check."""
    out: dict[int, tuple] = {}
    for reader, owner, name, value in reads:
        inst, keys = folder.top, tuple(reader)
        while keys and keys not in folder.instances:
            keys = keys[:-1]  # a call a pass moved (into a wrapper): the nearest call around it
        inst = folder.instances.get(keys, folder.top)
        while inst is not folder.top and inst.reason is not None:
            inst = inst.parent
        if inst is folder.top:
            if not root_has_graph:
                continue
        elif id(inst.module) not in graphs:
            continue
        out.setdefault(id(inst.module), (inst.module, [], {}))[1].append((owner, name, value))
    return out


def _unify(module: nn.Module, first: fx.Graph, other: fx.Graph) -> dict[str, str] | None:
    """Make ``other`` (a second call's graph of ``module``) call the modules a pass added to the first
    call where it calls equal ones added to itself; ``{its target: the first's}``, or None when the
    graphs differ otherwise."""
    a, b = list(first.nodes), list(other.nodes)
    if len(a) != len(b):
        return None
    renamed: dict[str, str] = {}
    for x, y in zip(a, b):
        if x.op == y.op == "call_module" and x.target != y.target and x.meta.get(ADDED) and y.meta.get(ADDED):
            if renamed.setdefault(y.target, x.target) != x.target:
                return None
            if not _equal_modules(module.get_submodule(x.target), module.get_submodule(y.target)):
                return None
    if not renamed:
        return None
    for y in b:
        if y.op == "call_module" and y.target in renamed:
            y.target = renamed[y.target]
    return renamed if _canonical(first) == _canonical(other) else None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _equal_modules(a: nn.Module, b: nn.Module) -> bool:
    """Same class, settings and tensors, no hooks and no children: one may stand for the other."""
    if type(a) is not type(b) or any(True for _ in a.children()) or any(True for _ in b.children()):
        return False
    if hook_kinds(a) or hook_kinds(b):
        return False
    settings = [{k: v for k, v in vars(m).items() if not k.startswith("_")} for m in (a, b)]
    if settings[0].keys() != settings[1].keys():
        return False
    for k, v in settings[0].items():
        w = settings[1][k]
        if isinstance(v, torch.Tensor) or isinstance(w, torch.Tensor) or type(v) is not type(w) or v != w:
            return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def install(root: nn.Module, root_graph: fx.Graph | None, graphs: dict) -> None:
    """Give every called module its graph (children first), then the region root its own
    (``root_graph`` None: the root runs its own forward again).

    All or nothing: if one module cannot take its graph, every module installed so far is put
    back as it was, and the error is raised.
    """
    undo = []
    try:
        with shared_compiles():  # blocks of one design: one compile
            for module, g in [*reversed(list(graphs.values())), (root, root_graph)]:
                undo.append(adoption_snapshot(module))
                if g is None:
                    release_graph(module)
                else:
                    adopt_graph(module, g)
    except Exception:
        for snapshot in reversed(undo):
            snapshot.restore()
        raise


def _remove_unified(root: nn.Module, unified: dict[str, str]) -> list[tuple]:
    """Remove the modules a pass added that equal ones now stand for (no graph calls them); returns
    what :func:`_undo` needs to put them back where they were (a container's order included)."""
    undo = []
    for removed in unified:
        parent, _, leaf = removed.rpartition(".")
        modules = root.get_submodule(parent)._modules
        undo.append((modules, None, dict(modules)))
        del modules[leaf]
    return undo


def _undo(undo: list[tuple]) -> None:
    """Put back dict entries: ``(dict, key, old value or None)``, or ``(dict, None, old contents)``."""
    for where, key, old in reversed(undo):
        if key is None:
            where.clear()
            where.update(old)
        elif old is None:
            where.pop(key, None)
        else:
            where[key] = old


class _FlatView(fx.GraphModule):
    """A region's flat graph over the model's own modules, for reading; its code is made when asked."""

    @property
    def code(self) -> str:
        if "_flat_code" not in self.__dict__:
            self.__dict__["_flat_code"] = self._graph.python_code(root_module="self").src
        return self.__dict__["_flat_code"]


def flat_view(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A read-only GraphModule of a region's flat graph over ``root``'s own modules and tensors.

    Analyses that look across module boundaries after a rewrite (``inspect``'s candidate blocks,
    the region tree's node counts) read it; it is never part of the model, and it is not compiled
    (no forward: its ``code`` is generated when read).
    """
    view = _FlatView(nn.Module(), fx.Graph(), class_name=type(root).__name__)
    for name in ("_modules", "_parameters", "_buffers"):
        view.__dict__[name] = root.__dict__[name]
    view.__dict__["_graph"] = graph
    graph.owning_module = view
    view.training = root.training
    return view


def fold_region(region) -> Fold:
    """Fold a traced region's flat graph into per-module graphs and install them (see the module doc).

    A region whose root could not take a graph as itself (``regions._graph_module``), or whose
    root graph cannot be cut, keeps its flat graph; the returned fold names why.
    """
    gm = region.module
    # The flat graph's guard, with paths as they are after the passes (a wrapper moves a block).
    install_guard(gm, [(m, name, value) for _, m, name, value in region.reads])
    if not is_adopted(gm):
        region.inlined = {region.path: "the region root runs fx's own GraphModule (its class defines a name fx needs)"}
        return Fold(inlined={"": region.inlined[region.path]})
    try:
        root_graph, graphs, fold, guards = fold_graph(gm, gm.graph, region.calls, region.captured, region.reads)
        flat = gm.graph
        undo = _remove_unified(gm, fold.unified)
        # Guards before the graphs: each forward is compiled once, with its checks.
        for module in [gm] * (root_graph is not None) + [m for m, _ in graphs.values()]:
            _, reads, context = guards.get(id(module), (module, [], {}))
            context["concrete"] = region.concrete if module is gm else None
            undo.append((module.__dict__, "_gt_guard", module.__dict__.get("_gt_guard")))
            install_guard(module, reads, respecialise, context)
        try:
            install(gm, root_graph, graphs)
        except Exception:
            _undo(undo)
            raise
    except Exception as e:  # noqa: BLE001 - a graph this cannot cut keeps running flat, and says why
        reason = e.reason if isinstance(e, _Unfoldable) else f"{type(e).__name__}: {one_line(e)}"
        region.inlined = {region.path: f"its graph was not cut into per-module graphs: {reason}"}
        return Fold(inlined={"": region.inlined[region.path]})
    region.module = flat_view(gm, flat)
    region.calls, region.captured, region.reads = {}, {}, []
    region.folded = [region.qualify(p) for p in fold.called]
    region.inlined = {region.qualify(p): reason for p, reason in fold.inlined.items()}
    return fold
