"""Checkpoints of the original model, mapped onto a rewritten one.

Passes that move a tensor register the move once, as a load-state-dict pre-hook on the module
they build (``Residual``: ``blk.0.weight`` → ``blk.body.0.weight``; ``NormAct``, what a timm
``BatchNormAct2d`` becomes under BN→LN: ``bn1.weight`` → ``bn1.norm.weight``). So
``rewritten.load_state_dict(original_sd, strict=False)`` puts every tensor that still has a home
there, and lists what has none (the running statistics BN→LN drops) in ``unexpected_keys``.
:func:`map_state_dict` runs the same hooks without loading, for people who load by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["MappedStateDict", "map_state_dict"]


class MappedStateDict(NamedTuple):
    """An original state dict under the rewritten model's keys, and what has no home there.

    Attributes:
        state_dict: ``{rewritten key: tensor}``, only keys the rewritten model has, with its shapes.
        leftovers: ``{original key: why}`` for each tensor that does not land (dropped running
            statistics, a key the model lacks, a shape that differs).
    """

    state_dict: dict[str, torch.Tensor]
    leftovers: dict[str, str]


def map_state_dict(result_or_model, original: Mapping[str, torch.Tensor]) -> MappedStateDict:
    """Map a state dict of the original model onto the keys of the rewritten one.

    Runs every load-state-dict pre-hook of the rewritten model on a copy of ``original`` (the
    moves passes registered) and sorts out what the model has no place for.

    Args:
        result_or_model: a :class:`~graphtricks.rewriting.RewriteResult` or the rewritten model.
        original: the original model's ``state_dict()`` (or a checkpoint of it).

    Returns:
        A :class:`MappedStateDict`: ``model.load_state_dict(mapped.state_dict, strict=False)``
        then misses only what the passes added (shortcuts, gates).

    Example:
        >>> mapped, leftovers = gt.map_state_dict(result, torch.load("original.pt"))
        >>> result.model.load_state_dict(mapped, strict=False)
    """
    model: nn.Module = getattr(result_or_model, "model", result_or_model)
    dropped = _dropped_by_passes(result_or_model)
    moved = dict(original)
    metadata = getattr(original, "_metadata", None)
    for name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        local = metadata.get(name, {}) if metadata is not None else {}
        for hook in list(module._load_state_dict_pre_hooks.values()):
            hook(moved, prefix, local, False, [], [], [])
    own = model.state_dict(keep_vars=True)
    mapped: dict[str, torch.Tensor] = {}
    leftovers: dict[str, str] = {}
    for key, tensor in moved.items():
        where = own.get(key)
        if where is None:
            leftovers[key] = dropped.get(key, "the rewritten model has no such tensor")
        elif isinstance(where, torch.Tensor) and tuple(where.shape) != tuple(tensor.shape):
            leftovers[key] = f"shape {tuple(tensor.shape)}, the rewritten model's is {tuple(where.shape)}"
        else:
            mapped[key] = tensor
    return MappedStateDict(mapped, leftovers)


def _dropped_by_passes(result) -> dict[str, str]:
    """``{key: why}`` for tensors a pass's change record says it dropped (BN→LN's statistics)."""
    report = getattr(result, "report", None)
    out = {}
    for change in getattr(report, "changes", ()):
        for key in (change.details or {}).get("dropped", ()):
            out[key] = f"dropped by {change.pass_name} at {change.where}"
    return out
