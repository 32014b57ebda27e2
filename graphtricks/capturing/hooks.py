"""The user's module hooks: find them, carry them to what replaces a module, keep them out of probes.

A trace inlines every module it goes through, and a ``GraphModule`` built from a module starts
without its hooks, so capture keeps a module that has hooks as a called module (a leaf of its
parent's trace) and gives its region the same hook dictionaries (:func:`copy_hooks`). A pass
that replaces a module moves its hooks to the replacement (:func:`move_hooks`). The rewrite's
own forwards (probes) and traces run with every user hook detached (:func:`hooks_detached`):
a hook must fire once per call of the user's, never for graphtricks' measuring runs.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

from torch import nn
from torch.nn.modules import module as module_internals

__all__ = ["HOOK_DICTS", "copy_hooks", "hook_kinds", "hooks_detached", "move_hooks"]

# The per-module dictionaries that hold forward and backward hooks (and their flags).
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_KINDS = {
    "_forward_hooks": "forward",
    "_forward_pre_hooks": "forward pre",
    "_backward_hooks": "backward",
    "_backward_pre_hooks": "backward pre",
}
_GLOBAL_DICTS = (
    "_global_forward_hooks",
    "_global_forward_hooks_always_called",
    "_global_forward_hooks_with_kwargs",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def hook_kinds(module: nn.Module) -> list[str]:
    """The kinds of hooks registered on ``module`` (``["forward", "backward"]``); empty when none."""
    return [kind for name, kind in _KINDS.items() if getattr(module, name, None)]


def copy_hooks(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` the hook dictionaries of ``source`` (the same objects: a handle removes from both)."""
    if source is target or not hook_kinds(source):
        return
    for name in HOOK_DICTS:
        if name in source.__dict__:
            target.__dict__[name] = source.__dict__[name]
    if "_is_full_backward_hook" in source.__dict__:
        target.__dict__["_is_full_backward_hook"] = source.__dict__["_is_full_backward_hook"]


def move_hooks(source: nn.Module, target: nn.Module) -> list[str]:
    """Move ``source``'s hooks to ``target`` (which replaces it); the kinds moved, for a note."""
    kinds = hook_kinds(source)
    if kinds:
        copy_hooks(source, target)
        for name in HOOK_DICTS:
            if name in source.__dict__:
                source.__dict__[name] = OrderedDict()
    return kinds


@contextlib.contextmanager
def hooks_detached(model: nn.Module | None):
    """While open, no user hook of ``model``'s modules, and no global module hook, runs.

    Hooks registered while it is open go to fresh dictionaries and are dropped on exit.
    """
    saved = []
    if model is not None:
        for module in model.modules():
            if hook_kinds(module):
                saved.append((module, {n: module.__dict__[n] for n in HOOK_DICTS if n in module.__dict__}))
                for name in saved[-1][1]:
                    module.__dict__[name] = OrderedDict()
    globals_saved = {name: getattr(module_internals, name) for name in _GLOBAL_DICTS if hasattr(module_internals, name)}
    for name, value in globals_saved.items():
        if value:
            setattr(module_internals, name, OrderedDict())
    try:
        yield
    finally:
        for name, value in globals_saved.items():
            setattr(module_internals, name, value)
        for module, dicts in saved:
            module.__dict__.update(dicts)
