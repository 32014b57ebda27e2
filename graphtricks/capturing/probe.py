"""Probes: one forward of a model with hooks attached, to measure what modules and graph nodes see.

A probe runs the model in eval mode (a BatchNorm must not update its running statistics) and
without autograd, without the user's hooks, and leaves it as it found it: hooks removed, replaced
forwards deleted, every module's train/eval flag, parameters, buffers and attributes restored. The shape forward of a rewrite is a probe; passes add
:class:`Observers` to it (what a BatchNorm → LayerNorm swap would change), or run a probe of
their own where the model has changed since (children of opaque modules, residual blocks).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphtricks.capturing.hooks import hooks_detached
from graphtricks.capturing.modes import ModeSnapshot
from graphtricks.capturing.state import StateSnapshot

__all__ = ["probe_forward", "watched_forward", "bind_call", "Observers", "FirstCall", "first_calls"]

Hook = Callable[..., Any]
# after(interpreter, node, value): called once a graph node has run.
NodeCallback = Callable[[fx.Interpreter, fx.Node, Any], None]


@dataclass
class Observers:
    """What a pass wants to see during a probe: module hooks and graph-node callbacks.

    Attributes:
        hooks: ``(module, hook)`` forward hooks, called ``hook(module, args, kwargs, output)``.
        after_node: ``(graph module, after)``: ``after(interpreter, node, value)`` runs after
            each node of that graph module's graph.
    """

    hooks: list[tuple[nn.Module, Hook]] = field(default_factory=list)
    after_node: list[tuple[fx.GraphModule, NodeCallback]] = field(default_factory=list)


def bind_call(sig: inspect.Signature, args: tuple, kwargs: dict) -> list[Any]:
    """Arrange a call's arguments in placeholder order (an Interpreter takes positional args)."""
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    return list(bound.arguments.values())


def probe_forward(
    model: nn.Module,
    inputs: tuple,
    *,
    pre_hooks: Iterable[tuple[nn.Module, Hook]] = (),
    hooks: Iterable[tuple[nn.Module, Hook]] = (),
    forwards: Iterable[tuple[nn.Module, Callable]] = (),
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """Run ``model(*inputs, **kwargs)`` once, in eval mode and without grad, with hooks and forwards in place.

    Args:
        model: the model to run.
        inputs: its positional inputs.
        kwargs: its keyword inputs.
        pre_hooks: ``(module, hook)`` forward pre-hooks, called ``hook(module, args, kwargs)``.
        hooks: ``(module, hook)`` forward hooks, called ``hook(module, args, kwargs, output)``.
        forwards: ``(module, forward)`` instance forwards that replace the class's for this run
            (a graph module run through an interpreter, as :func:`watched_forward` makes).

    Returns:
        The model's output.

    Example:
        >>> shapes = []
        >>> probe_forward(model, (x,), hooks=[(model.fc, lambda m, a, k, out: shapes.append(out.shape))])
    """
    # The user's hooks stay out of it (they fire once per call of theirs), and what the forward
    # writes to parameters, buffers and attributes (a step counter, an EMA) is put back.
    with hooks_detached(model):
        handles = [m.register_forward_pre_hook(h, with_kwargs=True) for m, h in pre_hooks]
        handles += [m.register_forward_hook(h, with_kwargs=True) for m, h in hooks]
        patched = []
        snapshot = ModeSnapshot(model)
        state = StateSnapshot(model)
        try:
            for module, forward in forwards:
                module.forward = forward
                patched.append(module)
            model.eval()
            with torch.no_grad():
                return model(*inputs, **(kwargs or {}))
        finally:
            snapshot.restore()
            for h in handles:
                h.remove()
            for module in patched:
                del module.forward  # back to the class's (generated) forward
            state.restore()


class _Watcher(fx.Interpreter):
    """Runs a graph node by node, calling each ``after(interpreter, node, value)`` after each node."""

    def __init__(self, gm: fx.GraphModule, afters: list[NodeCallback]):
        super().__init__(gm)
        self.afters = afters

    def fetch_attr(self, target: str) -> Any:
        # A module by the name table the interpreter made (fx walks getattr per path segment,
        # each a miss through the user's classes before ``nn.Module.__getattr__``).
        found = self.submodules.get(target) if isinstance(getattr(self, "submodules", None), dict) else None
        return found if found is not None else super().fetch_attr(target)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        for after in self.afters:
            after(self, n, out)
        return out


def watched_forward(gm: fx.GraphModule, *afters: NodeCallback, returned: Callable | None = None) -> Callable:
    """A forward for ``gm`` that runs its graph node by node and calls each ``after(interpreter, node, value)``.

    The interpreter lets ``after`` read a node's arguments (``fetch_args_kwargs_from_env``).
    ``returned(result)``, when given, sees each call's result. Install the forward with
    :func:`probe_forward`'s ``forwards``.
    """
    sig = inspect.signature(gm.forward)

    def forward(*args, **kwargs):
        result = _Watcher(gm, list(afters)).run(*bind_call(sig, args, kwargs))
        if returned is not None:
            returned(result)
        return result

    return forward


@dataclass
class FirstCall:
    """What a module received and returned on its first call.

    Attributes:
        args: how many arguments it got (positional and keyword).
        returned: the type name of what it returned.
        in_shape: the shape of its one tensor argument; None when it got anything else.
        out_shape: the shape of its output; None when that is no tensor.
        dtypes: ``(input dtype, output dtype)``, None where that is no tensor.
        mutated: its one tensor argument was written in place during the call.
    """

    args: int
    returned: str = ""
    in_shape: tuple | None = None
    out_shape: tuple | None = None
    dtypes: tuple = (None, None)
    mutated: bool = False


def first_calls(
    model: nn.Module, inputs: tuple, modules: list[nn.Module], kwargs: dict[str, Any] | None = None
) -> dict[int, FirstCall]:
    """One probing forward: for each of ``modules`` that ran (by ``id``), its first call.

    Example:
        >>> calls = first_calls(model, (x,), [model.stages[0]])
        >>> calls[id(model.stages[0])].out_shape
    """
    seen: dict[int, FirstCall] = {}
    pending: dict[int, tuple] = {}  # id → (its tensor input or None, that input's version)

    def pre(mod, args, kwargs):
        if id(mod) not in seen:
            x = args[0] if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) else None
            seen[id(mod)] = FirstCall(len(args) + len(kwargs))
            pending[id(mod)] = (x, x._version if x is not None else 0)

    def post(mod, args, kwargs, output):
        if id(mod) not in pending:
            return  # a later call
        x, version = pending.pop(id(mod))
        call = seen[id(mod)]
        call.returned = type(output).__name__
        if x is not None:
            # The version counter moves on every in-place write, through views too.
            call.in_shape, call.mutated = tuple(x.shape), x._version != version
        if isinstance(output, torch.Tensor):
            call.out_shape, call.dtypes = tuple(output.shape), (x.dtype if x is not None else None, output.dtype)

    probe_forward(model, inputs, pre_hooks=[(m, pre) for m in modules], hooks=[(m, post) for m in modules],
                  kwargs=kwargs)
    return seen
