"""Values a trace read: module attributes that fx bakes into a graph as constants.

fx runs Python once, at trace time: ``if self.grad_checkpointing:``, ``x / self.temperature``,
``x.topk(self.k)``, ``if self.global_pool == "avg":`` and ``for block in self.blocks:`` are
decided then, and the graph keeps only the outcome. A user who changes such a value on the
rewritten model (``model.reset_classifier(10, global_pool="avg")``, ``model.temperature = 2.0``)
would get the graph of the old value, silently. While a region is traced, :class:`ValueReads`
puts a property on each module class for every attribute of a guardable kind (bool, int, float,
str, None, enum, and tuples or lists of them) that its instances or its classes hold, and counts
the modules of each container iterated or measured (``len(self.blocks)``). It records which
values of which modules were read, with their values and the module call whose code read them
(the tracer's module stack), so that fold can give each regenerated forward the checks of what
its own code read (``fxgraph.adopt.install_guard``).
"""

from __future__ import annotations

import enum

from torch import nn

__all__ = ["LENGTH", "ValueReads", "guardable"]

_MISSING = object()
# The name under which a container's number of modules is recorded.
LENGTH = "__len__"
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_SIZED = ("__len__", "__iter__", "keys", "values", "items")
_SCALARS = (bool, int, float, str, type(None))
_MAX_ITEMS = 64  # longer sequences are data, not configuration: left alone


def guardable(value) -> bool:
    """True for a value a guard can compare cheaply: a scalar, an enum, or a short tuple/list of them."""
    if type(value) in _SCALARS or isinstance(value, enum.Enum):
        return True
    if type(value) in (tuple, list) and len(value) <= _MAX_ITEMS:
        return all(type(v) in _SCALARS or isinstance(v, enum.Enum) for v in value)
    return False


def _class_names(cls: type) -> set[str]:
    """Guardable class attributes of a module class (``gradient_checkpointing = False``), below nn.Module."""
    names = set()
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        for k, v in vars(klass).items():
            if not k.startswith("_") and k != "training" and guardable(v):
                names.add(k)
    return names


class ValueReads:
    """Context manager recording the attribute values a trace reads, and by whose code.

    Args:
        modules: the modules whose attributes to watch (those of the traced region).
        tracer: the tracer whose ``module_stack`` tells whose code is running; its
            ``quiet`` attribute, when true, silences the recording (graphtricks' own reads).

    Attributes:
        reads: ``{(reader, id(module), name): (reader, module, name, value)}`` for every value
            read, ``reader`` being the tracer's module stack keys at the read (``()`` = the
            traced root's own code); containers are recorded under the name ``LENGTH``.
    """

    def __init__(self, modules, tracer):
        self.reads: dict[tuple, tuple] = {}
        self.tracer = tracer
        self._names: dict[type, set[str]] = {}
        classes: dict[type, set[str]] = {}
        for module in modules:
            cls = type(module)
            if cls not in classes:
                classes[cls] = _class_names(cls)
            names = {k for k, v in vars(module).items()
                     if not k.startswith("_") and k != "training" and guardable(v)} | classes[cls]
            if names:
                self._names.setdefault(cls, set()).update(names)
        self._saved: list[tuple[type, str, object]] = []

    def _record(self, module: nn.Module, name: str, value) -> None:
        tracer = self.tracer
        if getattr(tracer, "quiet", False):
            return
        reader = tuple(tracer.module_stack)
        key = (reader, id(module), name)
        if key not in self.reads:
            self.reads[key] = (reader, module, name, list(value) if type(value) is list else value)

    def _property(self, name: str, default) -> property:
        record = self._record

        def get(module):
            value = module.__dict__.get(name, default)
            if value is _MISSING:
                raise AttributeError(name)  # Python then asks nn.Module.__getattr__ (a submodule, a buffer)
            if guardable(value):
                record(module, name, value)
            return value

        def set_(module, value):
            module.__dict__[name] = value

        return property(get, set_)

    def _sized(self, cls: type, method: str):
        original = vars(cls)[method]
        record = self._record

        def wrapper(module, *args):
            record(module, LENGTH, len(module._modules))
            return original(module, *args)

        return wrapper

    def __enter__(self) -> ValueReads:
        for cls, names in self._names.items():
            for name in names:
                if isinstance(vars(cls).get(name), property):
                    continue  # the class's own property: left as it is
                old = vars(cls).get(name, _MISSING)
                self._saved.append((cls, name, old))
                setattr(cls, name, self._property(name, getattr(cls, name, _MISSING) if old is _MISSING else old))
        for cls in _CONTAINERS:
            for method in _SIZED:
                if method in vars(cls):
                    self._saved.append((cls, method, vars(cls)[method]))
                    setattr(cls, method, self._sized(cls, method))
        return self

    def __exit__(self, *exc) -> None:
        for cls, name, old in reversed(self._saved):
            if old is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, old)
        self._saved.clear()
