"""An in-place rewrite is a transaction: on failure the caller's model is put back as it was.

A rewrite with ``inplace=True`` edits the caller's own objects pass after pass: children
replaced, modules added, buffers dropped, classes and forwards swapped for graphs. A failure
half-way (a pass that refuses a block, a fold or an install that fails) must not leave a model
that is neither the old one nor the new one (dropouts left in train mode inside a model that
reports eval, a retry that finds "nothing to do").

:class:`ModelSnapshot` records what the rewrite can change, without copying weights: for
every module its class and the entries of its ``__dict__`` — the ``_modules``, ``_parameters``,
``_buffers`` and hook dicts by content (restored in place, so that the user's hook handles
still remove their hooks), instance ``forward`` attributes, modes — the class attributes of
classes that belong to one instance (an adopted or ``GraphModule`` class, where installing a
graph sets ``forward``), each tensor's ``requires_grad``, and the values of buffers. Parameter
values are not kept: a pass that sets them (``Initialize``) writes through
``GraphtricksPass.write_values``, which an in-place rewrite defers until everything else has
succeeded (:func:`graphtricks.rewriting.rewrite`), so a failure finds them untouched and no copy
of the weights is made. Restoring a model of N modules costs what reading it did: no tensor is
copied back unless its version counter moved.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from graphtricks.fxgraph.adopt import is_adopted

__all__ = ["ModelSnapshot"]

# Containers in a module's __dict__ restored by content (their identity is held elsewhere:
# hook handles keep a weak reference to the hook dicts).
_CONTAINERS = (dict, list, set)


def _contents(value):
    """A shallow copy of a container's contents (the container itself is restored in place)."""
    return list(value.items()) if isinstance(value, dict) else list(value)


def _refill(container, contents) -> None:
    container.clear()
    if isinstance(container, dict):
        container.update(contents)
    elif isinstance(container, list):
        container.extend(contents)
    else:
        container.update(contents)


class ModelSnapshot:
    """The structure, modes, hooks and forwards of every module of a model, to put back on failure.

    Args:
        model: the model a rewrite is about to edit in place.

    Example:
        >>> snapshot = ModelSnapshot(model)
        >>> try:
        ...     edit(model)
        ... except Exception:
        ...     snapshot.restore()
        ...     raise
    """

    def __init__(self, model: nn.Module):
        self._modules = []
        self._classes: dict[type, dict] = {}
        tensors: dict[int, tuple[torch.Tensor, bool]] = {}
        for module in model.modules():
            state = dict(module.__dict__)
            held = [(key, value, type(value), _contents(value)) for key, value in state.items()
                    if isinstance(value, _CONTAINERS)]
            self._modules.append((module, type(module), state, held))
            cls = type(module)
            if (is_adopted(module) or isinstance(module, fx.GraphModule)) and cls not in self._classes:
                self._classes[cls] = dict(vars(cls))  # a class of this instance's own
            for t in module.__dict__.get("_buffers", {}).values():
                if t is not None:
                    tensors.setdefault(id(t), (t, True))
            for t in module.__dict__.get("_parameters", {}).values():
                if t is not None:
                    tensors.setdefault(id(t), (t, False))
        self._tensors = [(t, t.requires_grad, t._version, t.detach().clone() if keep and not t.is_meta else None)
                         for t, keep in tensors.values()]

    def restore(self) -> list[str]:
        """Put the model back as it was when the snapshot was taken.

        Returns:
            Tensors whose values changed and were not kept (none when the passes declared what
            they write), as ``Type.shape`` lines: what could not be put back.
        """
        for cls, namespace in self._classes.items():
            for key in set(vars(cls)) - set(namespace):
                delattr(cls, key)
            for key, value in namespace.items():
                if vars(cls).get(key, _MISSING) is not value and key not in ("__dict__", "__weakref__"):
                    setattr(cls, key, value)
        for module, cls, state, held in self._modules:
            if type(module) is not cls:
                module.__class__ = cls
            d = module.__dict__
            d.clear()
            d.update(state)
            for _key, container, kind, contents in held:
                if type(container) is kind:
                    _refill(container, contents)
        lost = []
        with torch.no_grad():
            for t, requires_grad, version, value in self._tensors:
                if t.requires_grad != requires_grad:
                    t.requires_grad_(requires_grad)
                if t._version != version:
                    if value is not None:
                        t.copy_(value)
                    else:
                        lost.append(f"{type(t).__name__}{tuple(t.shape)}")
        return lost


_MISSING = object()
