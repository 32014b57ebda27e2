"""Where the dropout pass may go where no graph shows it: what opaque code does with activations.

An opaque module keeps its own forward, so its dataflow is not in any graph. One eval forward of
the model (a probe) watches it instead: every activation child of an opaque module is seen, while
that module's forward runs, through a recording view (the same place :class:`CallerDropout` puts
the dropout later), and a ``TorchFunctionMode`` follows the values through every torch call to
tell, for each call of that activation:

- whether its input depends on the model's inputs at all (a value computed only from parameters
  and buffers — a learnt gate ``sigmoid(self.alpha)``, a position-bias MLP on a coordinates
  table — is no data: dropping it means nothing);
- whether its value, or a view of it, is a model output;
- what consumes it: a dropout (with which ``p``, from which module), a product with another tensor
  (a gate), or anything else.

The same forward tells, for traced regions called from opaque code, which of their inputs are
data, and counts the activations opaque code computes itself (``F.relu`` in its own forward),
which no pass can reach.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from graphtricks.capturing import RegionTree
from graphtricks.capturing.probe import probe_forward
from graphtricks.capturing.regions import expand_containers
from graphtricks.fxgraph.activations import ACTIVATION_FUNCTIONS, module_activation_name
from graphtricks.fxgraph.kinds import DROPOUT_FUNCTIONS, DROPOUT_MODULES, VIEW_METHODS
from graphtricks.layers.caller_dropout import ActivationView, caller_dropout_of, child_slot

__all__ = ["ActivationCall", "SiteProbe", "probe_sites", "opaque_activations"]

_MULS = frozenset({"mul", "mul_", "__mul__", "__rmul__", "__imul__"})
_VIEWS = VIEW_METHODS | {"__getitem__", "chunk", "split", "unbind", "narrow", "select"}


@dataclass
class ActivationCall:
    """One call of an activation child from its opaque parent's forward, as the probe saw it.

    Attributes:
        index: its order among that child's calls within one forward of the parent.
        data: its input depends on the model's inputs.
        output: its value, or a view of it, is a model output.
        consumers: what consumed its value: ``("dropout", p, module or None)``, ``("mul",)`` with
            another tensor, or ``("other",)``.
        shape: its output's shape (None when not a tensor).
    """

    index: int
    data: bool
    output: bool = False
    consumers: list[tuple] = field(default_factory=list)
    shape: tuple | None = None


@dataclass
class SiteProbe:
    """What one probe saw.

    Attributes:
        calls: per ``(id(opaque module), child name)``, each call of that activation child.
        data_inputs: per ``id(traced region module)`` below the root, the names of its placeholders
            that received data in some call (regions never called are absent).
        own_code: per ``id(opaque module)``, the activations its own code computed (names, in order).
    """

    calls: dict[tuple[int, str], list[ActivationCall]] = field(default_factory=dict)
    data_inputs: dict[int, set[str]] = field(default_factory=dict)
    own_code: dict[int, list[str]] = field(default_factory=dict)


def opaque_activations(module: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(name, child, activation name)`` of each activation child of an opaque module, those its
    ModuleLists and ModuleDicts hold included (``acts.1``), as capture sees its children."""
    out = []
    for child_name, child in module.named_children():
        for name, sub, _ in expand_containers(module, child_name, child):
            act = module_activation_name(sub)
            if act is not None:
                out.append((name, sub, act))
    return out


class _Refs:
    """Tensors by identity, held weakly (a forward's intermediates must not outlive it)."""

    def __init__(self):
        self._refs: dict[int, tuple[weakref.ref, Any]] = {}

    def add(self, tensor: torch.Tensor, value: Any = True) -> None:
        self._refs[id(tensor)] = (weakref.ref(tensor), value)

    def get(self, tensor: torch.Tensor, default: Any = None) -> Any:
        found = self._refs.get(id(tensor))
        return found[1] if found is not None and found[0]() is tensor else default


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


class _Flow(TorchFunctionMode):
    """Follows values through torch calls: which derive from the inputs, what consumes watched ones."""

    def __init__(self, inputs: list[torch.Tensor]):
        super().__init__()
        self.data, self.watched, self.views = _Refs(), _Refs(), _Refs()
        for t in inputs:
            self.data.add(t)
        self.dropouts: list[nn.Module] = []  # dropout modules running now (innermost last)
        self.frames: list[tuple[nn.Module, bool]] = []  # (module, is opaque) running now, innermost last
        self.own_code: dict[int, list[str]] = {}

    def is_data(self, value: Any) -> bool:
        return any(self.data.get(t, False) for t in _tensors(value))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        produced = _tensors(out)
        if not produced:
            return out  # a shape, a dtype, a size: reading metadata consumes no value
        inputs = _tensors((args, kwargs))
        if any(self.data.get(t, False) for t in inputs):
            for t in produced:
                self.data.add(t)
        name = getattr(func, "__name__", "")
        for t in inputs:
            call = self.watched.get(t)
            if call is not None:
                call.consumers.append(self._consumer(func, name, args, kwargs, t))
                if func in DROPOUT_FUNCTIONS and any(o is t for o in produced):
                    self.watched.add(t, None)  # eval-mode dropout returns its input: later readers read the dropout's
        if name in _VIEWS and inputs:
            origin = self.views.get(inputs[0])
            if origin is not None:
                for t in produced:
                    self.views.add(t, origin)
        if func in ACTIVATION_FUNCTIONS and self.frames and self.frames[-1][1]:
            self.own_code.setdefault(id(self.frames[-1][0]), []).append(ACTIVATION_FUNCTIONS[func])
        return out

    def _consumer(self, func, name: str, args: tuple, kwargs: dict, value: torch.Tensor) -> tuple:
        if func in DROPOUT_FUNCTIONS:
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            p = float(p) if isinstance(p, (int, float)) else None
            training = kwargs.get("training", kwargs.get("train", args[2] if len(args) > 2 else True))
            if p == 0 and training is True:
                return ("other",)  # on in eval mode too: giving it p would change eval outputs
            return ("dropout", p, self.dropouts[-1] if self.dropouts else None)
        others = [a for a in args if isinstance(a, torch.Tensor) and a is not value]
        if name in _MULS and len(args) == 2 and len(others) == 1:
            return ("mul",)
        return ("other",)


class _RecordingView(ActivationView):
    """An activation child as its opaque parent sees it during the probe: each call recorded."""

    def __init__(self, activation: nn.Module, flow: _Flow, calls: list[ActivationCall]):
        super().__init__(activation)
        object.__setattr__(self, "flow", flow)
        object.__setattr__(self, "calls", calls)
        self.count = 0

    def forward(self, *args, **kwargs):
        out = self.activation(*args, **kwargs)
        call = ActivationCall(self.count, self.flow.is_data((args, kwargs)),
                              shape=tuple(out.shape) if isinstance(out, torch.Tensor) else None)
        self.count += 1
        self.calls.append(call)
        if isinstance(out, torch.Tensor):
            self.flow.watched.add(out, call)
            self.flow.views.add(out, call)
        return out


def probe_sites(tree: RegionTree, inputs: tuple, kwargs: dict[str, Any] | None = None) -> SiteProbe:
    """One eval forward of ``tree.model`` that watches opaque code (see the module docstring).

    Raises:
        Exception: whatever the model raises on its example inputs (the caller names it).
    """
    found = SiteProbe()
    flow = _Flow(_tensors((inputs, kwargs or {})))
    opaque = [r.module for r in tree.regions() if r.kind == "opaque"]
    views: dict[int, list[tuple[str, nn.Module]]] = {}
    for module in opaque:
        taken = caller_dropout_of(module)
        names = [(n, c) for n, c, _ in opaque_activations(module) if taken is None or n not in taken.sites]
        if names:
            views[id(module)] = names
            for name, _ in names:
                found.calls[(id(module), name)] = []

    def put(module: nn.Module, name: str, value: nn.Module) -> None:
        holder, key = child_slot(module, name)
        holder[key] = value

    def enter(module, args, kw):
        flow.frames.append((module, True))
        for name, child in views.get(id(module), ()):
            put(module, name, _RecordingView(child, flow, found.calls[(id(module), name)]))

    def leave(module, args, kw, out):
        flow.frames.pop()
        for name, child in views.get(id(module), ()):
            put(module, name, child)

    pre, post = [(m, enter) for m in opaque], [(m, leave) for m in opaque]
    ids = {id(m) for m in opaque}
    # While any other module runs, an opaque module's own code does not.
    others = [m for m in tree.model.modules() if id(m) not in ids]
    pre += [(m, lambda m, a, k: flow.frames.append((m, False))) for m in others]
    post += [(m, lambda m, a, k, o: flow.frames.pop() and None) for m in others]  # a hook's value replaces the output
    drops = [m for m in tree.model.modules() if isinstance(m, DROPOUT_MODULES)]
    pre += [(d, lambda m, a, k: flow.dropouts.append(m)) for d in drops]
    post += [(d, lambda m, a, k, o: flow.dropouts.pop() and None) for d in drops]
    for region in tree.regions():
        if region.kind == "traced" and region.path:
            pre.append((region.module, _data_inputs_hook(region.module, flow, found)))
    try:
        with flow:
            output = probe_forward(tree.model, inputs, pre_hooks=pre, hooks=post, kwargs=kwargs)
    finally:
        for module in opaque:  # also when the forward raised
            for name, child in views.get(id(module), ()):
                put(module, name, child)
    for t in _tensors(output):
        call = flow.views.get(t)
        if call is not None:
            call.output = True
    found.own_code = flow.own_code
    return found


def _data_inputs_hook(gm: nn.Module, flow: _Flow, found: SiteProbe):
    """A pre-hook noting which placeholders of a traced region receive data."""
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        sig = inspect.signature(gm.forward)
    except (TypeError, ValueError):
        sig = None

    def hook(module, args, kwargs):
        seen = found.data_inputs.setdefault(id(module), set())
        try:
            bound = sig.bind(*args, **kwargs).arguments if sig is not None else dict(zip(names, args))
        except TypeError:
            bound = dict(zip(names, args))
        for (name, value), placeholder in zip(bound.items(), names):
            if flow.is_data(value):
                seen.add(placeholder if name not in names else name)

    return hook
