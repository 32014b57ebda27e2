"""Whether a trace read a ``training`` flag: if it did not, the eval-mode trace would be the same.

fx bakes ``self.training`` into a graph (DESIGN.md), so capture traces each region in train and
in eval mode and compares. While the train-mode trace runs, :class:`TrainingReads` puts a
property named ``training`` on ``nn.Module``: a property on the class wins over the flag each
module keeps in its ``__dict__``, so every read of any module's flag — from a forward, a method
of another module, a helper function, a hook — passes through it and is counted. A region none
of whose code read a flag, and none of whose modules override ``train()`` (which may set flags
of other names), gives the same graph in both modes: its second trace is skipped.
"""

from __future__ import annotations

import threading

from torch import nn

__all__ = ["TrainingReads", "overrides_train"]

_MISSING = object()
# One counting property at a time: nested or concurrent traces share it.
_lock = threading.RLock()
_active: list[TrainingReads] = []
_saved: list = [_MISSING]  # what nn.Module.training was before the property went in


def _get(module: nn.Module) -> bool:
    for reads in _active:
        reads.count += 1
    return module.__dict__["training"]


def _set(module: nn.Module, value: bool) -> None:
    module.__dict__["training"] = value


class TrainingReads:
    """Context manager that counts reads of any module's ``training`` flag while it is open.

    Example:
        >>> with TrainingReads() as reads:
        ...     tracer.trace(module)
        >>> reads.count
        0
    """

    def __init__(self):
        self.count = 0

    def __enter__(self) -> TrainingReads:
        with _lock:
            if not _active:
                _saved[0] = nn.Module.__dict__.get("training", _MISSING)
                nn.Module.training = property(_get, _set)
            _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        with _lock:
            _active.remove(self)
            if not _active:
                if _saved[0] is _MISSING:
                    del nn.Module.training
                else:
                    nn.Module.training = _saved[0]


def overrides_train(module: nn.Module) -> bool:
    """True when ``module`` or a descendant defines its own ``train()`` (it may set other flags)."""
    return any(type(m).train is not nn.Module.train for m in module.modules())
