"""Train/eval flags: snapshot and restore them, module by module."""

from __future__ import annotations

from torch import nn

__all__ = ["ModeSnapshot", "adopt_parent_modes"]


class ModeSnapshot:
    """The ``training`` flag of every module of a model, to restore after tracing or export.

    A model may be in a mixed state (a frozen BatchNorm in eval inside a model in train),
    so flags are kept per module, not for the root alone.
    """

    def __init__(self, model: nn.Module):
        self._flags = [(m, m.training) for m in model.modules()]

    def restore(self) -> None:
        """Put every module back in the mode it had when the snapshot was taken."""
        for module, training in self._flags:
            module.training = training

    @staticmethod
    def copy_modes(source: nn.Module, target: nn.Module) -> None:
        """Give each module of ``target`` the mode of the module at the same path in ``source``."""
        flags = {name: m.training for name, m in source.named_modules(remove_duplicate=False)}
        for name, module in target.named_modules():
            if name in flags:
                module.training = flags[name]


def adopt_parent_modes(model: nn.Module, known: set[int]) -> None:
    """Modules a rewrite added (not in ``known``) take the mode of their parent.

    A new ``nn.Dropout`` starts in train mode; in a model that was in eval mode it must not.
    """

    def visit(module: nn.Module, parent_training: bool) -> None:
        if id(module) not in known:
            module.training = parent_training
        for child in module.children():
            visit(child, module.training)

    visit(model, model.training)


