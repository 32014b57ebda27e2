"""Tracing one region: fx in train and eval mode, the modules that make the two differ, and calls.

:func:`trace_once` traces a module with the leaves capture chose; :func:`mode_dependent_owners`
compares the two modes' graphs owner by owner (``nn_module_stack``); :func:`record_calls`
records, in one eval forward, how the children of opaque modules are called, so that each can
be traced specialised on its non-tensor arguments (:func:`concrete_args`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphtricks.capturing.checkpoints import checkpoint_functions, name_checkpoint_calls, not_traced_through
from graphtricks.capturing.flag_reads import ValueReads
from graphtricks.capturing.hooks import hooks_detached
from graphtricks.capturing.mode_reads import TrainingReads, overrides_train
from graphtricks.capturing.probe import probe_forward
from graphtricks.capturing.state import StateWrites
from graphtricks.errors import CaptureError
from graphtricks.fxgraph.activations import zoo_activation_name
from graphtricks.fxgraph.adopt import is_adopted
from graphtricks.fxgraph.nodes import owner_path
from graphtricks.layers import is_leaf_layer

__all__ = [
    "Call",
    "InlinedCall",
    "concrete_args",
    "mode_dependent_owners",
    "one_line",
    "record_calls",
    "restore_placeholder_names",
    "trace_once",
]

_CONCRETE_TYPES = (type(None), bool, int, float, str)

@dataclass
class InlinedCall:
    """One call of a module the trace went through: its arguments and result, as graph nodes.

    ``args``/``kwargs``/``result`` are what the caller passed and got back, with every proxy
    replaced by its node; ``key`` is the call's key in the nodes' ``nn_module_stack``.
    """

    module: nn.Module
    key: str
    args: tuple
    kwargs: dict
    result: Any
    chain: tuple = ()  # (stack key, module path) of this call and every call around it, outermost first


def _as_nodes(value):
    """``value`` with proxies replaced by their nodes, inside plain tuples, lists and dicts only."""
    if isinstance(value, fx.Proxy):
        return value.node
    if type(value) in (tuple, list):
        return type(value)(_as_nodes(v) for v in value)
    if type(value) is dict:
        return {k: _as_nodes(v) for k, v in value.items()}
    return value  # a constant, or an object fold will not take apart


class RegionTracer(fx.Tracer):
    """An fx tracer that keeps the given module objects as leaves, and records the calls it inlines.

    ``calls`` maps each inlined call's ``nn_module_stack`` key to an :class:`InlinedCall`: what
    folding the graph back into per-module graphs needs (``capture.fold``).
    """

    def __init__(self, leaves: set[int] | None = None):
        functions, modules = checkpoint_functions()
        # Checkpointing stays a call in the graph (fx would trace through it, and the block would
        # run once per forward and backward): the functions are recorded as calls, the modules
        # they are given as the modules themselves (``get_attr``), captured as regions of their own.
        super().__init__(autowrap_functions=functions)
        self._autowrap_search.extend(modules)
        # A default, because pickling a GraphModule re-creates its tracer class with no arguments.
        self.leaves = leaves if leaves is not None else set()
        self.calls: dict[str, InlinedCall] = {}
        self.quiet = False  # True while graphtricks' own code reads modules (ValueReads ignores it)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        self.quiet = True
        try:
            if id(m) not in self.leaves and is_adopted(m):
                return False  # a built-in module a pass gave a graph (an activation with its dropout): traced
            return (id(m) in self.leaves or is_leaf_layer(m) or zoo_activation_name(m) is not None
                    or super().is_leaf_module(m, module_qualified_name))
        finally:
            self.quiet = False

    def call_module(self, m: nn.Module, forward, args, kwargs):
        def recorded(*a, **k):
            chain = tuple((key, value[0]) for key, value in self.module_stack.items())
            key = chain[-1][0] if chain else ""
            result = forward(*a, **k)
            self.calls[key] = InlinedCall(m, key, _as_nodes(a), _as_nodes(k), _as_nodes(result), chain)
            return result

        return super().call_module(m, recorded, args, kwargs)


@dataclass
class Call:
    """What a module received on its first call during the recording run."""

    args: tuple
    kwargs: dict
    count: int = 1
    consistent: bool = True


def call_key(args: tuple, kwargs: dict) -> tuple:
    """A hashable summary of the non-tensor values of a call (tensors reduced to a marker)."""

    def one(v):
        if isinstance(v, torch.Tensor):
            return "<tensor>"
        if isinstance(v, _CONCRETE_TYPES):
            return (type(v).__name__, v)
        return f"<{type(v).__name__}>"

    return tuple(one(a) for a in args) + tuple((k, one(v)) for k, v in sorted(kwargs.items()))


def record_calls(
    model: nn.Module, example_inputs: tuple, modules: list[nn.Module], example_kwargs: dict | None = None
) -> dict[int, Call]:
    """Run ``model`` once and record how each of ``modules`` is called (first call, count)."""
    calls: dict[int, Call] = {}
    keys: dict[int, tuple] = {}

    def hook(mod, args, kwargs):
        key = call_key(args, kwargs)
        seen = calls.get(id(mod))
        if seen is None:
            calls[id(mod)] = Call(args, dict(kwargs))
            keys[id(mod)] = key
        else:
            seen.count += 1
            seen.consistent = seen.consistent and keys[id(mod)] == key

    # eval (in probe_forward): a train-mode BatchNorm would update its running statistics
    probe_forward(model, example_inputs, pre_hooks=[(m, hook) for m in modules], kwargs=example_kwargs)
    return calls


def concrete_args(module: nn.Module, args: tuple, kwargs: dict) -> tuple[dict[str, Any], str]:
    """Concrete (non-tensor) arguments to specialise a trace on, and a note of them.

    Raises:
        CaptureError: an argument is neither a tensor nor a plain constant (fx cannot trace it).
    """
    sig = inspect.signature(module.forward)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise CaptureError(f"cannot bind call arguments: {e}") from e
    bound.apply_defaults()
    concrete: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            if value:
                raise CaptureError(f"takes *args/**kwargs ({name})")
            continue
        if isinstance(value, torch.Tensor):
            continue
        if not isinstance(value, _CONCRETE_TYPES):
            raise CaptureError(f"argument {name!r} is a {type(value).__name__}, not a tensor or constant")
        concrete[name] = value
    note = ", ".join(f"{k}={v!r}" for k, v in concrete.items() if v is not None)
    return concrete, (f"specialised on {note}" if note else "")


def restore_placeholder_names(graph: fx.Graph, module: nn.Module) -> None:
    """Give placeholders the parameter names of ``forward`` (concrete args get renamed ``x_1``)."""
    params = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) == len(params):
        for node, name in zip(placeholders, params):
            node.target = name


def node_signature(node: fx.Node) -> tuple:
    """What a node does, independent of node names (which shift when nodes are added)."""

    def norm(v):
        if isinstance(v, fx.Node):
            return "%"
        if isinstance(v, (tuple, list)):
            return tuple(norm(x) for x in v)
        if isinstance(v, dict):
            return tuple((k, norm(x)) for k, x in v.items())
        return repr(v)

    return (node.op, str(node.target), norm(node.args), norm(node.kwargs))


def mode_dependent_owners(train: fx.Graph, infer: fx.Graph) -> set[str]:
    """Owners (module paths) whose own nodes differ between the train and eval traces."""

    def by_owner(graph):
        out: dict[str, list] = {}
        for n in graph.nodes:
            out.setdefault(owner_path(n), []).append(node_signature(n))
        return out

    a, b = by_owner(train), by_owner(infer)
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def trace_once(module: nn.Module, leaves: set[int], concrete: dict, training: bool):
    """Trace ``module`` in one mode, leaving its state as it was (no global hook runs).

    Returns:
        ``(graph, None, reads_training, writes)``, or ``(None, (culprit_path, error), True, {})``
        on failure; ``writes`` maps the path of each module whose own forward updated state a
        graph would not keep to what it updated (:class:`StateWrites`). The inlined calls are
        kept on the graph as ``graph._gt_calls`` (:class:`InlinedCall` by stack key), the values it
        read as ``graph._gt_reads`` (:class:`~graphtricks.capturing.flag_reads.ValueReads`).
    """
    module.train(training)
    tracer = RegionTracer(leaves)
    try:
        with (hooks_detached(None), TrainingReads() as reads, StateWrites(module, tracer) as writes,
              ValueReads(module.modules(), tracer) as values, not_traced_through()):
            graph = tracer.trace(module, concrete_args=concrete or None)
    except Exception as e:  # any failure of user code under tracing makes something opaque
        stack = list(tracer.module_stack.values())
        return None, (stack[-1][0] if stack else "", e), True, {}
    name_checkpoint_calls(graph)
    graph._gt_calls = tracer.calls
    # Reads made while a leaf was being called (its forward is not in the graph) are not the graph's.
    graph._gt_reads = [r for r in values.reads.values() if not r[0] or r[0][-1] in tracer.calls]
    return graph, None, reads.count > 0 or overrides_train(module), writes.owners


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first}"[:200]
