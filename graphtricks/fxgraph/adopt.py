"""A module keeps its class and takes a graph: the original object becomes its own GraphModule.

fx's ``GraphModule(module, graph)`` is a new object of a new class that borrows the class name:
the class's other methods (timm's ``forward_features``, ``reset_classifier``), the module tree
(intermediate modules become empty ``nn.Module``\\ s) and everything the graph does not reference
are gone. :func:`adopt_graph` instead gives the *same object* a class of its own, a subclass of
both its class and ``GraphModule``, whose ``forward`` is the graph's generated code. Everything
else — attributes, children, hooks, state dict keys, methods, ``isinstance`` — is the module's.

Copies and pickles keep the class too: ``GraphModule``'s own ``__deepcopy__`` and ``__reduce__``
rebuild a plain GraphModule with only what the graph references, so the adopted class replaces
them with versions that copy the whole module and rebuild the graph on the copy.
"""

from __future__ import annotations

import copy
import inspect

import torch.fx as fx
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch import nn
from torch.fx.graph_module import _format_import_block, reduce_graph_module
from torch.package import sys_importer

from graphtricks.errors import GraphtricksError
from graphtricks.fxgraph.fastpath import speed_up
from graphtricks.fxgraph.lookup import submodule

__all__ = [
    "adopt_graph",
    "adoption_conflict",
    "adoption_snapshot",
    "compile_when_called",
    "Guard",
    "install_guard",
    "is_adopted",
    "original_class",
    "release_graph",
]

_MARK = "_graphtricks_adopted"
_WAITING = "_graphtricks_compiles_when_called"  # on a forward that compiles the graph first
# What GraphModule keeps on each instance (GraphModule.__init__), with fresh values.
_INSTANCE_STATE = {
    "_tracer_extras": dict,
    "meta": dict,
    "_replace_hooks": list,
    "_create_node_hooks": list,
    "_erase_node_hooks": list,
    "_deepcopy_hooks": list,
    "shape_env": lambda: None,
}
# Names a class of the user's must not define for GraphModule to work on it.
_RESERVED = ({n for n in vars(fx.GraphModule) if not n.startswith("__")}
             | set(_INSTANCE_STATE) | {"_graph", "_code", "_tracer_cls", "_lineno_map", "_prologue_start",
                                       "_in_spec", "_out_spec"})
_adopted_classes: dict[type, type] = {}


def is_adopted(module: nn.Module) -> bool:
    """True when ``module`` runs a graph given by :func:`adopt_graph`."""
    return getattr(type(module), _MARK, False)


def original_class(module: nn.Module | type) -> type:
    """The user's class of ``module`` (itself when it was never adopted)."""
    cls = module if isinstance(module, type) else type(module)
    for klass in cls.__mro__:
        if vars(klass).get(_MARK):
            return klass.__bases__[0]
    return cls


def adoption_conflict(module: nn.Module) -> str | None:
    """Why ``module`` cannot take a graph as itself (a name GraphModule needs is its own), or None."""
    cls = original_class(module)
    if issubclass(cls, fx.GraphModule):
        return "it is an fx GraphModule already"
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        clash = sorted(_RESERVED & set(vars(klass)))
        if clash:
            return f"{klass.__name__} defines {clash[0]!r}, which a graph module needs"
    clash = sorted(_RESERVED & set(vars(module)))
    if clash and not is_adopted(module):
        return f"it has an attribute {clash[0]!r}, which a graph module needs"
    return None


def _adopted_class(cls: type) -> type:
    """The class shared by every adopted instance of ``cls`` (each instance subclasses it once more)."""
    found = _adopted_classes.get(cls)
    if found is None:
        namespace = {
            _MARK: True,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            "__deepcopy__": _deepcopy,
            "__copy__": _copy,
            "__reduce__": _reduce,
            "__str__": _str,
            "code": property(_code, doc="The graph's generated Python (generated now if an edit made it stale)."),
            "recompile": _recompile,
            "__jit_unused_properties__": [*getattr(fx.GraphModule, "__jit_unused_properties__", ()), "code"],
            # Each adopted child was compiled when it took its graph; fx would compile the subtree again.
            "_recompile_submodules": lambda self: [],
            "_replicate_for_data_parallel": nn.Module._replicate_for_data_parallel,
        }
        found = type(cls.__name__, (cls, fx.GraphModule), namespace)
        _adopted_classes[cls] = found
    return found


def _instance_class(cls: type) -> type:
    """A class for one instance: ``recompile`` sets ``forward`` on it, so no two instances share one."""
    adopted = _adopted_class(cls)
    return type(cls.__name__, (adopted,), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})


def adopt_graph(module: nn.Module, graph: fx.Graph, *, compile: bool = True) -> nn.Module:
    """Make ``module`` run ``graph`` as its forward, keeping the object, its class's methods and state.

    The graph's ``get_attr``/``call_module`` targets are looked up on ``module`` itself. Called
    again on an adopted module, it only installs the new graph. ``compile=False``: its code is
    generated and compiled on its first call or read of ``code`` (a region graph that passes
    will edit and fold will cut up).

    Returns:
        ``module`` (now also an ``fx.GraphModule``: ``.graph``, ``.code``, ``recompile()``).

    Raises:
        TypeError: the module's class defines a name GraphModule needs (:func:`adoption_conflict`).
    """
    if not is_adopted(module):
        reason = adoption_conflict(module)
        if reason:
            raise TypeError(f"{type(module).__name__} cannot run a graph as itself: {reason}")
        state = {name: make() for name, make in _INSTANCE_STATE.items()}
        tracer_cls = graph._tracer_cls
        state["_tracer_cls"] = tracer_cls if tracer_cls and "<locals>" not in tracer_cls.__qualname__ else None
        module.__dict__.update(state)
        module.__class__ = _instance_class(original_class(module))
    if compile:
        module.graph = graph  # owning module, generated code, forward
    else:
        module.__dict__["_graph"] = graph  # what the ``graph`` setter does, but the compile
        graph.owning_module = module
        _compile_when_called(module, _placeholder_signature(graph))
    return module


def release_graph(module: nn.Module) -> nn.Module:
    """Undo :func:`adopt_graph`: ``module`` runs its own class's forward again (same object, its state
    as it is now, minus what running a graph kept on it)."""
    if is_adopted(module):
        for name in _RESERVED | {"_gt_guard"}:
            module.__dict__.pop(name, None)
        module.__class__ = original_class(module)
    return module


def compile_when_called(module: nn.Module) -> None:
    """After an edit of an adopted module's graph: its code is generated and compiled on its next
    call (or read of ``code``), not now.

    A rewrite edits a region's graph pass after pass and then cuts it into per-module graphs;
    compiling after each edit made code that nothing ran. The edit must keep the graph's inputs
    (the forward's signature stays the one compiled before). A module that is no adopted one
    (fx's own GraphModule) is compiled now.
    """
    cls = type(module)
    if not is_adopted(module) or "_code" not in module.__dict__:
        if not getattr(cls.forward, _WAITING, False):  # compiled at its next call already
            module.recompile()
        return
    _compile_when_called(module, inspect.signature(cls.forward))  # callers bind to it as before


def _compile_when_called(module: nn.Module, signature: inspect.Signature | None) -> None:
    """Give ``module``'s class a forward that compiles the graph, then runs it (None: compile now)."""
    if signature is None:
        module.recompile()
        return

    def forward(self, *args, **kwargs):
        self.recompile()  # sets the class's forward to the graph's code
        return self.forward(*args, **kwargs)

    forward.__signature__ = signature
    setattr(forward, _WAITING, True)
    module.__dict__.pop("_code", None)
    type(module).forward = forward  # the instance's own class (_instance_class)


def _placeholder_signature(graph: fx.Graph) -> inspect.Signature | None:
    """The signature of the forward fx would generate for ``graph`` (None where its code
    generator is not fx's plain one, whose signature is its placeholders)."""
    if type(graph._codegen) is not fx.graph.CodeGen:
        return None
    kinds = inspect.Parameter
    params = [kinds("self", kinds.POSITIONAL_OR_KEYWORD)]
    for node in graph.find_nodes(op="placeholder"):
        name = str(node.target)
        kind = (kinds.VAR_KEYWORD if name.startswith("**") else kinds.VAR_POSITIONAL if name.startswith("*")
                else kinds.POSITIONAL_OR_KEYWORD)
        default = node.args[0] if node.args and kind is kinds.POSITIONAL_OR_KEYWORD else kinds.empty
        params.append(kinds(name.lstrip("*"), kind, default=default))
    try:
        return inspect.Signature(params)
    except ValueError:  # not a signature Python takes: fx's own compile says why
        return None


def _recompile(self):
    """``GraphModule.recompile``; a module with a guard then gets the forward that checks it
    (``fastpath.speed_up``): copies, pickles and edits never run a graph unchecked."""
    python_code = fx.GraphModule.recompile(self)
    if "_gt_guard" in self.__dict__:
        speed_up(self)
    return python_code


def _code(self) -> str:
    if "_code" not in self.__dict__:
        self.recompile()
    return self.__dict__["_code"]


class adoption_snapshot:  # noqa: N801 - used like a function: ``undo = adoption_snapshot(m)``
    """What :func:`adopt_graph` changes on a module, to put back with :meth:`restore`."""

    def __init__(self, module: nn.Module):
        self.module, self.cls, self.state = module, type(module), dict(module.__dict__)

    def restore(self) -> None:
        module = self.module
        for key in set(module.__dict__) - set(self.state):
            del module.__dict__[key]
        module.__dict__.update(self.state)
        module.__class__ = self.cls
        if is_adopted(module):  # its class's forward was compiled from the graph it had
            module.recompile()


class Guard:
    """The attribute values a module's regenerated forward was specialised on, checked per call.

    fx bakes every value the traced code read into the graph (a flag's branch, a temperature, a
    pooling mode, the number of blocks in a container). The fast forward (``fastpath.py``) starts
    with one comparison of the values now against :attr:`expected`; when they differ it calls
    :meth:`failed`, which re-specialises the module (``respecialise``: its original forward traced
    again with the values now, the same edits applied again) or refuses in one line.

    Attributes:
        entries: ``(path, owner, name)`` per value: the owner as a path from the module (or, for
            a module outside it, the object), the attribute (``flag_reads.LENGTH``: the number of
            modules of a container).
        expected: the values, in the order of ``entries``.
        respecialise: ``fn(module, guard) -> str | None``, a module-level function (pickles by
            name): it installs a new graph and guard and returns None, or returns why it cannot.
        context: what ``respecialise`` needs (picklable).
    """

    def __init__(self, entries: list, expected: tuple, respecialise=None, context: dict | None = None):
        self.entries, self.expected = entries, expected
        self.respecialise, self.context = respecialise, context or {}

    def values_source(self, root: str, names) -> tuple[str, dict]:
        """The source of a tuple expression of the values now (``root`` names the module), and its globals."""
        globals_ = {}
        missing = names.new("missing")
        globals_[missing] = _ABSENT
        parts = []
        for path, owner, name in self.entries:
            if owner is not None:
                local = names.new("owner")
                globals_[local] = owner
                where = local
            else:
                where = root + "".join(f"._modules[{p!r}]" for p in path.split(".")) if path else root
            parts.append(f"len({where}._modules)" if name == _LENGTH else f"getattr({where}, {name!r}, {missing})")
        return "(" + "".join(p + ", " for p in parts) + ")", globals_

    def now(self, module: nn.Module) -> tuple | None:
        """The values now (None when an owner is no longer there)."""
        out = []
        try:
            for path, owner, name in self.entries:
                where = owner if owner is not None else submodule(module, path) if path else module
                out.append(len(where._modules) if name == _LENGTH else getattr(where, name, _ABSENT))
        except (AttributeError, KeyError):
            return None
        return tuple(out)

    def failed(self, module: nn.Module, now: tuple | None):
        """Re-specialise ``module`` to the values now and return its new forward, or raise."""
        changed = self._first_change(now)
        why = "its regenerated forward cannot be rebuilt"
        if is_fx_symbolic_tracing():
            why = "it is being traced (call it once first, then trace it)"
        elif self.respecialise is not None and now is not None:
            why = self.respecialise(module, self)
            if why is None:
                return module.forward
        index = self.entries.index(changed)
        got = "<gone>" if now is None else repr(now[index])
        raise GraphtricksError(
            f"{self.describe(module, changed)} was {self.expected[index]!r} when this model was rewritten and is {got}"
            f" now; {why}: set it back, or set it on the original model and rewrite that again")

    @staticmethod
    def describe(module: nn.Module, entry: tuple) -> str:
        """How the message names a guarded value: ``ResNet.drop_rate``, ``len(VisionTransformer.blocks)``."""
        path, owner, name = entry
        if owner is not None:
            where = type(owner).__name__
        else:
            where = type(module).__name__ + (f".{path}" if path else "")
        return f"len({where})" if name == _LENGTH else f"{where}.{name}"

    def _first_change(self, now: tuple | None) -> tuple:
        if now is None:
            return self.entries[0]
        for entry, was, value in zip(self.entries, self.expected, now):
            if was != value:
                return entry
        return self.entries[0]


_ABSENT = type("_Absent", (), {"__repr__": lambda self: "<no attribute>", "__reduce__": lambda self: "_ABSENT"})()
_LENGTH = "__len__"  # capture.flag_reads.LENGTH (capture comes after fxgraph)


def install_guard(module: nn.Module, reads: list, respecialise=None, context: dict | None = None,
                  by_path: bool = True) -> Guard | None:
    """Make ``module``'s regenerated forward check, on every call, the values its trace read
    (from its next compile: ``adopt_graph``, ``recompile()``).

    Args:
        module: an adopted module.
        reads: ``(owner module, name, value)`` for each value read (``capture.flag_reads``).
        respecialise: what to call when a value changed (see :class:`Guard`); None: refuse.
        context: what ``respecialise`` needs.
        by_path: check the module at each owner's path (a submodule replaced later is checked);
            False: the owner objects themselves (while passes still move modules about).

    Returns:
        The guard, or None when nothing was read.
    """
    paths = {id(m): name for name, m in module.named_modules(remove_duplicate=False)} if by_path else {}
    entries, expected, seen = [], [], set()
    for owner, name, value in reads:
        key = (id(owner), name)
        if key in seen:
            continue
        seen.add(key)
        path = paths.get(id(owner))
        entries.append((path, None, name) if path is not None else ("", owner, name))
        # A container's length as it is now: passes add modules to containers (a dropout after an
        # activation of a Sequential), and the graph calls them by name.
        expected.append(len(owner._modules) if name == _LENGTH else value)
    if not entries:
        module.__dict__.pop("_gt_guard", None)
        return None
    guard = Guard(entries, tuple(expected), respecialise, context)
    module.__dict__["_gt_guard"] = guard
    return guard


def _str(self) -> str:
    return repr(self)


def _fresh_copy(self: nn.Module) -> nn.Module:
    return object.__new__(_instance_class(original_class(self)))


def _deepcopy(self: nn.Module, memo: dict) -> nn.Module:
    """A deep copy with the same class and module tree, and a copy of the graph of its own."""
    new = _fresh_copy(self)
    memo[id(self)] = new
    state = {k: v for k, v in self.__dict__.items() if k != "_graph"}
    new.__dict__.update(copy.deepcopy(state, memo))
    new.graph = copy.deepcopy(self._graph)
    return new


def _copy(self: nn.Module) -> nn.Module:
    new = _fresh_copy(self)
    new.__dict__.update(self.__dict__)
    new.graph = self._graph
    return new


def _reduce(self: nn.Module):
    """Pickle as GraphModule does (the generated code, not the graph), rebuilt as the user's class."""
    python_code = self.recompile()
    body = {k: v for k, v in self.__dict__.items() if k != "_graph"}
    return _rebuild, (original_class(self), body, _format_import_block(python_code.globals, sys_importer))


def _rebuild(cls: type, body: dict, import_block: str) -> nn.Module:
    """Unpickle: the graph is traced again from the generated code, onto a module of class ``cls``."""
    plain = reduce_graph_module(dict(body), import_block)
    module = object.__new__(_instance_class(cls))
    module.__dict__.update(body)
    graph = plain.graph
    module.graph = graph
    return module
