"""Names: the two files a folder holds, and graph input and output names (given or defaulted).

Inputs default to the forward's positional parameter names (``input_ids``); outputs to the
keys of a mapping output (a Hugging Face ``ModelOutput``: ``last_hidden_state``), else
``output`` or ``output_0, output_1, ...``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from graphtricks.errors import ExportError, ValidationError
from graphtricks.onnx.eager import named_outputs, non_tensor_outputs, reference_copy

__all__ = ["INFER_FILE", "TRAIN_FILE", "checked_names", "default_input_names", "eval_outputs"]

TRAIN_FILE = "model.train.onnx"
INFER_FILE = "model.infer.onnx"


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


def eval_outputs(model: nn.Module, inputs: tuple) -> tuple[list[tuple[str, Any]], list[str]]:
    """Runs a copy of ``model`` in eval mode on the example inputs.

    Returns:
        Its output tensors with their default graph output names (:func:`named_outputs`), and
        the outputs that hold no tensor, which the graphs leave out.

    Raises:
        ExportError: The model cannot be copied, rejects the inputs, or returns no tensor.
    """
    try:
        twin = reference_copy(model, train=False, device="cpu")
        with torch.no_grad():
            value = twin(*inputs)
        named = named_outputs(value)
    except ValidationError as e:
        raise ExportError(str(e)) from e
    except Exception as e:
        raise ExportError(
            f"the model rejects the example inputs ({type(e).__name__}: {e}); "
            "pass example inputs of the shapes and dtypes it expects"
        ) from e
    if not named:
        raise ExportError("the model returns no tensor; nothing to export")
    return named, non_tensor_outputs(value)
