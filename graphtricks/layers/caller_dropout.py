"""Dropout after an activation module that an opaque module calls, seen only by that caller.

An opaque module keeps its own forward, so graphtricks cannot put a dropout node after
``self.act(x)`` in it. Changing the activation module itself (activation → dropout) would
change it for everyone: a direct call ``model.block.act(x)``, a hook on ``act``, another module
sharing that activation object, and the call whose value is the model output would all see the
dropout. Instead the dropout is applied *at the caller*: while the opaque module's forward runs,
its attribute ``act`` (or item ``acts[1]`` of a ModuleList or ModuleDict it holds) is an
:class:`ActivationThenDropout` view that calls the activation module
itself (its hooks fire and see the activation alone), then the dropout, on the calls chosen at
rewrite time (by their order within one forward: a call whose value is a model output is not
chosen). Outside that forward ``act`` is the activation module, unchanged.

:class:`CallerDropout` is the pair of hooks on the opaque module that puts the views in and takes
them out again (also when its forward raises). Both are plain importable classes, so a rewritten
model deep-copies and pickles with them, and ONNX export (which runs the forward) records the
dropout in train mode and nothing in eval mode. The dropout module is a registered child of the
opaque module (``act_dropout``), so ``train()``/``eval()``, ``.to()`` and the state dict treat it as
any other. One model run from several threads at once may see a view in one thread removed by
another: run copies, as for any module holding per-call state.
"""

from __future__ import annotations

from torch import nn

__all__ = ["ActivationThenDropout", "ActivationView", "CallerDropout", "caller_dropout_of", "child_slot"]

# The containers capture looks into for a module's children (fxgraph.kinds.CONTAINERS, which
# this earlier stage cannot import): an activation held in one is its holder's child too
CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def child_slot(module: nn.Module, name: str) -> tuple[dict, str] | None:
    """Where the child ``name`` of ``module`` is held: ``(a _modules dict, key)``. A dotted name
    reaches into containers (``acts.1``: item 1 of the ModuleList ``acts``); None when absent."""
    *path, key = name.split(".")
    holder = module
    for part in path:
        holder = holder._modules.get(part)
        if not isinstance(holder, CONTAINERS):
            return None
    return holder._modules, key


class ActivationView(nn.Module):
    """Stands for an activation module in its caller: the activation's attributes read through."""

    def __init__(self, activation: nn.Module):
        super().__init__()
        # Not registered as a child: a view is never part of the model's tree.
        object.__setattr__(self, "activation", activation)

    def __getattr__(self, name: str):
        # The caller may read the activation's settings (``self.act.inplace``): they are its.
        try:
            return super().__getattr__(name)
        except AttributeError:
            activation = self.__dict__.get("activation")
            if activation is None:
                raise
            return getattr(activation, name)


class ActivationThenDropout(ActivationView):
    """What an opaque module sees as its activation child while its forward runs.

    Args:
        activation: the activation module (called as it is, hooks and all).
        dropout: the dropout applied after it.
        calls: which calls of this forward (0 = the first) get the dropout.
    """

    def __init__(self, activation: nn.Module, dropout: nn.Module, calls: tuple[int, ...]):
        super().__init__(activation)
        object.__setattr__(self, "dropout", dropout)
        self.calls = frozenset(calls)
        self.count = 0  # calls so far in this forward
        self.depth = 1  # nested forwards of the opaque module using this view

    def forward(self, *args, **kwargs):
        out = self.activation(*args, **kwargs)
        index, self.count = self.count, self.count + 1
        return self.dropout(out) if index in self.calls else out


class CallerDropout:
    """Forward pre-hook (:meth:`enter`) and always-called hook (:meth:`leave`) of an opaque module.

    Args:
        sites: per activation child name, ``(dropout child name, call indices)``.
    """

    def __init__(self, sites: dict[str, tuple[str, tuple[int, ...]]]):
        self.sites = {name: (drop, tuple(calls)) for name, (drop, calls) in sites.items()}

    def enter(self, module: nn.Module, args) -> None:
        """Show each activation child to ``module``'s forward through its view."""
        for name, (drop, calls) in self.sites.items():
            slot, dropout = child_slot(module, name), module._modules.get(drop)
            current = slot[0].get(slot[1]) if slot is not None else None
            if isinstance(current, ActivationThenDropout):
                current.depth += 1  # a nested call of the same module keeps the outer view
            elif current is not None and dropout is not None and dropout.training:
                # (an eval-mode dropout is the identity: no view, no cost; MC dropout sets it training)
                slot[0][slot[1]] = ActivationThenDropout(current, dropout, calls)

    def leave(self, module: nn.Module, args, output) -> None:
        """Put the activation children back once ``module``'s forward has returned (or raised)."""
        for name in self.sites:
            slot = child_slot(module, name)
            current = slot[0].get(slot[1]) if slot is not None else None
            if isinstance(current, ActivationThenDropout):
                current.depth -= 1
                if current.depth == 0:
                    slot[0][slot[1]] = current.activation

    def install(self, module: nn.Module) -> None:
        """Register both hooks on ``module``."""
        module.register_forward_pre_hook(self.enter)
        module.register_forward_hook(self.leave, always_call=True)

    def __repr__(self) -> str:
        return f"CallerDropout({self.sites})"


def caller_dropout_of(module: nn.Module) -> CallerDropout | None:
    """The :class:`CallerDropout` installed on ``module``, or None."""
    for hook in module._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, CallerDropout):
            return owner
    return None
