"""Which modules' code may read a ``training`` flag: those are the only ones fx can trace differently by mode.

fx bakes ``self.training`` into a graph (DESIGN.md), so capture traces each region in train and
in eval mode and compares. A region whose traced modules never read ``training`` gives the same
graph in both modes, and its second trace can be skipped. This module answers that question
from the bytecode, conservatively: any name ``training`` read or written, as an attribute or a
string constant, in a module's ``forward``, in the methods and module-level functions it
refers to (followed a few calls deep) or in functions nested in them, counts as a read; code it
cannot follow within the depth limit counts as a read too. A wrong "no" would bake train-mode
behaviour into an eval graph, so every doubt answers "yes".
"""

from __future__ import annotations

import functools
import types
from typing import Any

from torch import nn

__all__ = ["module_reads_training"]

_NAME = "training"
# Deeper than any helper chain seen in torchvision, timm or transformers forwards.
_MAX_DEPTH = 6


def module_reads_training(module: nn.Module) -> bool:
    """True when ``module``'s own forward (and the Python code it calls) may read a ``training`` flag.

    Example:
        >>> module_reads_training(torchvision.models.resnet.Bottleneck(64, 16))
        False
    """
    return _class_reads(type(module))


@functools.cache
def _class_reads(cls: type) -> bool:
    return _Reader(cls).reads(getattr(cls, "forward", None), 0)


class _Reader:
    """Walks the code reachable from one class's forward."""

    def __init__(self, cls: type):
        self.cls = cls
        self.seen: set[int] = set()

    def reads(self, obj: Any, depth: int) -> bool:
        return any(self._reads_function(fn, depth) for fn in _functions(obj))

    def _reads_function(self, fn: Any, depth: int) -> bool:
        code = fn.__code__
        if id(code) in self.seen:
            return False
        if depth > _MAX_DEPTH:
            return True
        self.seen.add(id(code))
        names = _names(code)
        if _NAME in names:
            return True
        return any(self.reads(f, depth + 1) for f in self._callees(fn, names))

    def _callees(self, fn: types.FunctionType, names: set[str]):
        """Python callables ``fn``'s code may reach by name: methods of the class, globals, closure cells."""
        for name in names:
            for klass in self.cls.__mro__:  # every definition: ``super().forward(x)`` reaches the base's
                if name in vars(klass):
                    yield vars(klass)[name]
        globals_ = getattr(fn, "__globals__", {})
        for name in names:
            value = globals_.get(name)
            if isinstance(value, types.ModuleType):  # ``utils.helper(self, x)``: any attribute it names
                for attr in names:
                    member = getattr(value, attr, None)
                    if _outside_torch(member):
                        yield member
            elif _outside_torch(value):
                yield value
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if callable(value) and not isinstance(value, type):
                yield value


def _functions(obj: Any) -> list:
    """The Python functions behind a function, method, property, partial or decorated function.

    C functions have none: they see only the values a Python caller passed them.
    """
    if isinstance(obj, (staticmethod, classmethod, types.MethodType)):
        return _functions(obj.__func__)
    if isinstance(obj, property):
        return [f for acc in (obj.fget, obj.fset) if acc is not None for f in _functions(acc)]
    if isinstance(obj, functools.partial):
        return _functions(obj.func)
    out = [obj] if isinstance(getattr(obj, "__code__", None), types.CodeType) else []
    wrapped = getattr(obj, "__wrapped__", None)
    if wrapped is not None and wrapped is not obj:
        out += _functions(wrapped)
    return out


def _names(code: types.CodeType) -> set[str]:
    """Attribute and global names and string constants of ``code`` and the code nested in it."""
    out = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, str):
            out.add(const)
        elif isinstance(const, types.CodeType):  # lambdas, comprehensions, nested functions
            out |= _names(const)
    return out


def _outside_torch(value: Any) -> bool:
    """A plain Python function not from torch (torch's functions take ``training`` as an argument)."""
    if not isinstance(value, (types.FunctionType, functools.partial)):
        return False
    module = getattr(value, "__module__", None) or ""
    return not (module == "torch" or module.startswith("torch."))
