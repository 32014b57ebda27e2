"""What a user set on a model that its weights do not hold: kept by ``save``, put back by ``load``.

A folder's weights are values only. A rebuild replays the recipe on a freshly built source
model, which has every parameter trainable, every module in train mode and the state-dict
metadata of its own classes. The user may have frozen a backbone, switched to eval, or built
the model from classes whose ``_load_from_state_dict`` reads the metadata's ``version``
(torchvision MNASNet). :func:`record` writes those down (into ``structure.json``);
:func:`restore` puts them back and says what does not fit; :func:`load_weights` loads the
safetensors file with the metadata a state dict carries.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["record", "restore", "load_weights"]


def _non_persistent(model: nn.Module) -> list[str]:
    return sorted(f"{name}.{b}" if name else b for name, m in model.named_modules()
                  for b in m._non_persistent_buffers_set if b in m._buffers and m._buffers[b] is not None)


def record(model: nn.Module) -> dict[str, Any]:
    """The flags, modes and metadata of ``model`` a rebuild would not have (JSON-ready).

    Example:
        >>> record(model)["frozen"]
        ['layer1.0.conv1.weight', ...]
    """
    mode = model.training
    metadata = getattr(model.state_dict(), "_metadata", None) or {}
    return {
        "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
        "training": mode,
        "other_mode": [n for n, m in model.named_modules() if n and m.training != mode],
        "non_persistent": _non_persistent(model),
        "metadata": {k: dict(v) for k, v in metadata.items()},
    }


def restore(model: nn.Module, saved: dict[str, Any] | None) -> str | None:
    """Put back what :func:`record` wrote; the first thing that does not fit, in words, or None."""
    if not saved:
        return None
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    for name in saved.get("frozen", ()):
        if name not in params:
            return f"the frozen parameter {name} is not in the rebuilt model"
    for name in saved.get("other_mode", ()):
        if name not in modules:
            return f"module {name} (saved in the other train/eval mode) is not in the rebuilt model"
    want = saved.get("non_persistent")
    if want is not None and sorted(want) != _non_persistent(model):
        got = set(_non_persistent(model))
        diff = sorted(set(want) ^ got)
        side = "saved" if diff[0] in want else "rebuilt"
        return f"the non-persistent buffer {diff[0]} is only in the {side} model"
    frozen = set(saved.get("frozen", ()))
    for name, p in params.items():
        p.requires_grad_(name not in frozen)
    mode = bool(saved.get("training", model.training))
    model.train(mode)
    for name in saved.get("other_mode", ()):
        modules[name].training = not mode
    return None


def load_weights(model: nn.Module, path: str | Path, metadata: dict | None = None) -> None:
    """Load a safetensors file into ``model`` strictly, with state-dict ``metadata``.

    ``metadata`` defaults to the model's own (what its classes would save), so a layer whose
    ``_load_from_state_dict`` reads its version gets one. Tensors saved once for several names
    (tied weights) count as loaded under each.

    Raises:
        RuntimeError: keys missing or unexpected (safetensors' wording), or a shape mismatch.
    """
    from safetensors.torch import load_file

    state = load_file(str(path))
    own = model.state_dict(keep_vars=True)
    meta = metadata if metadata else getattr(own, "_metadata", None)
    if meta is not None:
        state = OrderedDict(state)
        state._metadata = OrderedDict((k, dict(v)) for k, v in meta.items())  # type: ignore[attr-defined]
    out = model.load_state_dict(state, strict=False)
    # Tied tensors are stored under one name (safetensors' save_model drops the others).
    by_storage: dict[tuple, list[str]] = {}
    for key, t in own.items():
        if t.device.type != "meta" and t.numel():
            by_storage.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(key)
    loaded = set(state)
    shared = {k for group in by_storage.values() if loaded & set(group) for k in group}
    missing = [k for k in out.missing_keys if k not in shared]
    if missing or out.unexpected_keys:
        raise RuntimeError(f"Error(s) in loading state_dict: missing keys {missing[:5]}, unexpected keys {out.unexpected_keys[:5]}")
