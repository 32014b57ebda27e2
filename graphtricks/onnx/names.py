"""Names: the two files a folder holds, and graph input and output names (given or defaulted).

Inputs default to the forward's positional parameter names (``input_ids``); outputs to the
keys of a mapping output (a Hugging Face ``ModelOutput``: ``last_hidden_state``), else
``output`` or ``output_0, output_1, ...``. What the model returns in train mode only (the
auxiliary heads of GoogLeNet and Inception v3) is a train graph output of its own,
``train_only.<name>`` (:data:`TRAIN_ONLY_PREFIX`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from graphtricks.errors import ExportError, ValidationError
from graphtricks.onnx.eager import named_outputs, non_tensor_outputs, reference_copy

__all__ = [
    "CONSTANT_PREFIX", "INFER_FILE", "MC_FILE", "TRAIN_FILE", "TRAIN_ONLY_PREFIX", "checked_names", "default_input_names",
    "mode_outputs", "train_only_names", "train_output_names",
]

TRAIN_FILE = "model.train.onnx"
INFER_FILE = "model.infer.onnx"
MC_FILE = "model.mc.onnx"  # the MC-dropout graph: eval mode with every dropout on
# The train graph's outputs the model returns in train mode only: train_only.aux_logits1
TRAIN_ONLY_PREFIX = "train_only."
# The torch.export-based exporter's own constants (not the model's parameters or buffers), named
# by content so that equal constants share a name in both graphs: constant.<hash>
CONSTANT_PREFIX = "constant."


def checked_names(given: Any, count: int, default: list[str], what: str) -> list[str]:
    """``given`` when it is ``count`` distinct strings, ``default`` when None.

    Raises:
        ExportError: ``given`` has the wrong length, repeats a name or holds a non-string.
    """
    if given is None:
        return default
    names = list(given)
    distinct = len(set(names)) == len(names) and all(isinstance(n, str) for n in names)
    if len(names) != count or not distinct:
        raise ExportError(f"{what} must be {count} distinct strings, got {names!r}")
    return names


def default_input_names(model: nn.Module, count: int) -> list[str]:
    """The forward's parameter names when they fit, else input_0, input_1, ..."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional[:count] if len(positional) >= count else [f"input_{i}" for i in range(count)]


def _run_mode(twin: nn.Module, inputs: tuple, train: bool) -> Any:
    """The raw output of ``twin`` (a copy) in one mode on the example inputs."""
    try:
        with torch.no_grad():
            twin.train(train)  # not its result: an overriding train() may return None
            return twin(*inputs)
    except Exception as e:
        mode = "train" if train else "eval"
        raise ExportError(
            f"the model rejects the example inputs in {mode} mode ({type(e).__name__}: {e}); "
            "pass example inputs of the shapes and dtypes it expects"
        ) from e


def mode_outputs(
    model: nn.Module, inputs: tuple, copy: nn.Module | None = None
) -> tuple[list[tuple[str, Any]], list[str], list[tuple[str, Any]]]:
    """Runs one copy of ``model`` on the example inputs in eval mode, then in train mode.

    One copy serves both runs (``copy``, a reference copy of the model, or a new one): only the
    structure, dtypes and shapes of the outputs are used, which the runs' effect on the copy's
    buffers does not change.

    Returns:
        The eval-mode output tensors with their default graph output names
        (:func:`named_outputs`), the eval-mode outputs that hold no tensor (the graphs leave
        them out), and the train-mode output tensors with their default names.

    Raises:
        ExportError: The model cannot be copied, rejects the inputs in either mode, or returns
            no tensor in eval mode.
    """
    if copy is None:
        try:
            copy = reference_copy(model, train=False, device="cpu")
        except ValidationError as e:
            raise ExportError(str(e)) from e
    twin = copy
    value = _run_mode(twin, inputs, train=False)
    named = named_outputs(value)
    if not named:
        raise ExportError("the model returns no tensor; nothing to export")
    return named, non_tensor_outputs(value), named_outputs(_run_mode(twin, inputs, train=True))


def _same_kind(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape


def train_output_names(
    infer: list[tuple[str, torch.Tensor]], train: list[tuple[str, torch.Tensor]], names: list[str]
) -> list[str]:
    """The train graph's output names: the inference graph's ``names`` for the outputs both
    modes return, ``train_only.<name>`` for what train mode returns on top.

    The shared outputs are found by name (a mapping or namedtuple returning more keys in train
    mode), else as the first ones (train mode returning ``(main, aux)`` where eval mode
    returns ``main``); they must have the same dtype and shape in both modes.

    Args:
        infer: The eval-mode outputs with their default names (:func:`mode_outputs`).
        train: The train-mode outputs with their default names (:func:`mode_outputs`).
        names: The inference graph's output names, one per ``infer`` output.

    Raises:
        ExportError: Train mode returns fewer or other tensors than eval mode.
    """
    if len(train) == len(infer):  # what differs by mode beyond that, validation tells
        return list(names)
    by_default = {n: k for k, (n, _) in enumerate(infer)}
    shared = [n for n, _ in train if n in by_default]
    if len(train) > len(infer) and shared == [n for n, _ in infer] and all(
        _same_kind(t, infer[by_default[n]][1]) for n, t in train if n in by_default
    ):
        return [
            names[by_default[n]] if n in by_default else f"{TRAIN_ONLY_PREFIX}{n}" for n, _ in train
        ]
    k = len(infer)
    if len(train) > k and all(_same_kind(t, i) for (_, t), (_, i) in zip(train[:k], infer)):
        return list(names) + [f"{TRAIN_ONLY_PREFIX}{n}" for n, _ in train[k:]]

    def shapes(named: list) -> str:
        return ", ".join(f"{n} {tuple(t.shape)}" for n, t in named)

    raise ExportError(
        f"the model returns {shapes(train)} in train mode and {shapes(infer)} in eval mode: "
        "the model must return the same tensors in train and eval mode, train mode possibly "
        "with more after them (auxiliary outputs)"
    )


def train_only_names(names: list[str]) -> list[str]:
    """The train-only outputs among graph output ``names``."""
    return [n for n in names if n.startswith(TRAIN_ONLY_PREFIX)]
