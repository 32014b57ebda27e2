"""Flags a trace read: plain ``bool`` attributes of modules that fx bakes into a graph.

fx runs Python control flow once, at trace time: ``if self.grad_checkpointing:`` (timm) or
``if self.fused_attn:`` is decided then, and the graph has no trace of the question. A user who
flips such a flag on the rewritten model (``model.set_grad_checkpointing(True)``) would get the
graph of the old value, silently. While a region is traced, :class:`FlagReads` puts a property
on each module class for every ``bool`` its instances hold, and records which flags of which
modules were read, with their values; the region root then checks them on every call
(``fxgraph.adopt``: ``_gt_flags``) and refuses, in one line, to run a graph whose flag changed.
"""

from __future__ import annotations

from torch import nn

__all__ = ["FlagReads"]

_MISSING = object()


class FlagReads:
    """Context manager recording reads of the ``bool`` attributes of ``modules`` while it is open.

    Attributes:
        reads: ``{(id(module), name): (module, name, value)}`` for every flag read.
    """

    def __init__(self, modules):
        self.reads: dict[tuple[int, str], tuple[nn.Module, str, bool]] = {}
        self._names: dict[type, set[str]] = {}
        for module in modules:
            names = {k for k, v in vars(module).items() if type(v) is bool and k != "training" and not k.startswith("_")}
            if names:
                self._names.setdefault(type(module), set()).update(names)
        self._saved: list[tuple[type, str, object]] = []

    def _property(self, name: str, default) -> property:
        reads = self.reads

        def get(module):
            value = module.__dict__.get(name, default)
            if value is _MISSING:
                raise AttributeError(name)
            if type(value) is bool:
                reads.setdefault((id(module), name), (module, name, value))
            return value

        def set_(module, value):
            module.__dict__[name] = value

        return property(get, set_)

    def __enter__(self) -> FlagReads:
        for cls, names in self._names.items():
            for name in names:
                if isinstance(vars(cls).get(name), property):
                    continue  # the class's own property: left as it is
                old = vars(cls).get(name, _MISSING)
                self._saved.append((cls, name, old))
                setattr(cls, name, self._property(name, getattr(cls, name, _MISSING) if old is _MISSING else old))
        return self

    def __exit__(self, *exc) -> None:
        for cls, name, old in reversed(self._saved):
            if old is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, old)
        self._saved.clear()
