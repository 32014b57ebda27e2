"""Submodules by path, as a graph's ``call_module`` and ``get_attr`` targets name them."""

from __future__ import annotations

from torch import nn

__all__ = ["submodule"]


def submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)``, walking the children dicts directly.

    ``get_submodule`` asks ``hasattr`` then ``getattr`` per path segment, each a miss through the
    class's attributes before ``nn.Module.__getattr__`` finds the child: passes look modules up
    per node, and that was a third of the dropout pass. Anything unusual (no such child, a child
    reached some other way) goes to ``get_submodule`` itself, with its own error.
    """
    module = root
    for name in str(path).split(".") if path else ():
        child = module.__dict__.get("_modules", {}).get(name)
        if child is None:
            return root.get_submodule(path)
        module = child
    return module
