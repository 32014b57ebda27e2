"""State updates: what a trace would drop, and forwards that leave a model's state as they found it.

fx records only operations that touch a proxy. A forward that updates its module's state
with real tensors — ``self.steps += 1``, ``self.ema.mul_(0.9)``, ``self.last = ...`` — does it
once, while tracing, and the graph never does it again (DESIGN.md, "fx flattens, and drops
what it does not see"). :class:`StateWrites` watches a trace for such updates (in-place ops on
a parameter or buffer that involve no proxy; attribute assignments on any module), names the
module whose forward was running, and undoes them when the trace ends. :class:`StateSnapshot`
does the undoing for an eager forward (the rewrite's probes): parameters, buffers and plain
attributes are put back as they were.
"""

from __future__ import annotations

import threading

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from graphtricks.fxgraph.kinds import is_builtin_module

__all__ = ["StateSnapshot", "StateWrites"]

# In-place dunders (``a += b`` reaches the mode as ``add_`` on tensors, but not always).
_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
                    "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__setitem__"}
# Attributes fx itself sets on the traced root (tensor constants it lifts).
_FX_ATTRIBUTES = ("_tensor_constant", "_param_constant")
_lock = threading.RLock()
_active: list[StateWrites] = []
_module_setattr = nn.Module.__setattr__


def _is_inplace(func) -> bool:
    name = getattr(func, "__name__", "")
    return name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("_"))


def _watched_setattr(module: nn.Module, name: str, value) -> None:
    for writes in _active:
        writes.assigned(module, name)
    _module_setattr(module, name, value)


class StateWrites(TorchFunctionMode):
    """Context manager for a trace: which modules' forwards update state a graph would not keep.

    Attributes:
        owners: module path (relative to the traced root, "" for the root) → what its forward
            updated, e.g. ``"buffer steps in place (add_)"``.

    Example:
        >>> with StateWrites(module, tracer) as writes:
        ...     tracer.trace(module)
        >>> writes.owners
        {'counter': 'buffer steps in place (add_)'}
    """

    def __init__(self, root: nn.Module, tracer: fx.Tracer):
        super().__init__()
        self.tracer = tracer
        self.owners: dict[str, str] = {}
        self._names: dict[int, str] = {}
        for kind, named in (("parameter", root.named_parameters), ("buffer", root.named_buffers)):
            for name, t in named(remove_duplicate=False):
                self._names.setdefault(id(t), f"{kind} {name}")
        self._undo_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._undo_attrs: dict[tuple[int, str], tuple[nn.Module, object]] = {}

    def _owner(self) -> str:
        stack = list(self.tracer.module_stack.values())
        return stack[-1][0] if stack else ""

    def _note(self, what: str) -> None:
        owner = self._owner()
        seen = self.owners.get(owner)
        if seen is None:
            self.owners[owner] = what
        elif what not in seen.split("; "):
            self.owners[owner] = f"{seen}; {what}"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = kwargs.get("out") if "out" in kwargs else (args[0] if args and _is_inplace(func) else None)
        if isinstance(target, torch.Tensor) and not isinstance(target, fx.Proxy):
            base = target._base if target._base is not None else target
            name = self._names.get(id(base))
            if name is not None and not any(isinstance(v, fx.Proxy) for v in tree_flatten((args, kwargs))[0]):
                if id(base) not in self._undo_values:
                    with torch.no_grad():
                        self._undo_values[id(base)] = (base, base.detach().clone())
                self._note(f"{name} in place ({getattr(func, '__name__', func)})")
        return func(*args, **kwargs)

    def assigned(self, module: nn.Module, name: str) -> None:
        """Called for every ``module.name = value`` while open."""
        if name == "training" or name.startswith(_FX_ATTRIBUTES):
            return
        key = (id(module), name)
        if key not in self._undo_attrs:
            missing = name not in module.__dict__ and not any(
                name in module.__dict__.get(d, {}) for d in ("_parameters", "_buffers", "_modules"))
            self._undo_attrs[key] = (module, _MISSING if missing else getattr(module, name))
        self._note(f"sets self.{name}" if module is self._module_at(self._owner()) else f"sets {name} on a module")

    def _module_at(self, path: str):
        try:
            return self.tracer.root.get_submodule(path) if path else self.tracer.root
        except AttributeError:
            return None

    def __enter__(self) -> StateWrites:
        with _lock:
            if not _active:
                nn.Module.__setattr__ = _watched_setattr
            _active.append(self)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        with _lock:
            _active.remove(self)
            if not _active:
                nn.Module.__setattr__ = _module_setattr
        # Undo what the trace did to the real model: it ran once, outside any graph.
        with torch.no_grad():
            for tensor, value in self._undo_values.values():
                tensor.copy_(value)
        for (_, name), (module, value) in reversed(list(self._undo_attrs.items())):
            if value is _MISSING:
                if hasattr(module, name):
                    delattr(module, name)
            else:
                _module_setattr(module, name, value)


_MISSING = object()


class StateSnapshot:
    """Parameters, buffers and plain attributes of every module of a model, to put back after a forward.

    Buffers and the parameters of modules that are not built-in layers are copied (a built-in
    layer never writes its own parameters in forward); values that changed are written back in
    place, and tensors or attributes replaced by assignment are put back, new ones removed.
    """

    def __init__(self, model: nn.Module):
        self._modules = []
        for module in model.modules():
            d = module.__dict__
            attrs = {k: v for k, v in d.items() if k[:1] != "_"}  # k[:1]: cheaper than startswith
            attrs.pop("forward", None)
            own = list(d.get("_buffers", {}).values())
            if not is_builtin_module(module):
                own += list(d.get("_parameters", {}).values())
            values = [(t, t._version, t.detach().clone()) for t in own if t is not None]
            self._modules.append((module, attrs, d.keys() - {"forward"}, dict(d.get("_parameters", {})),
                                  dict(d.get("_buffers", {})), values))

    def restore(self) -> None:
        """Put every value back as it was when the snapshot was taken."""
        with torch.no_grad():
            for module, attrs, keys, params, buffers, values in self._modules:
                d = module.__dict__
                if d.keys() != keys:  # an attribute added (set operations: the common case costs little)
                    for key in d.keys() - keys:
                        if key[:1] != "_" and key != "forward":
                            del d[key]
                d.update(attrs)
                d["_parameters"].clear()
                d["_parameters"].update(params)
                d["_buffers"].clear()
                d["_buffers"].update(buffers)
                for tensor, version, value in values:
                    if tensor._version != version:
                        tensor.copy_(value)
