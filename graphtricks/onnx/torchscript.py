"""One call of torch's TorchScript ONNX exporter, made quiet and with readable errors.

The exporter is deprecated but is the only one that exports train-mode BatchNorm with batch
statistics; its deprecation warnings are dropped here and nowhere else, and the warnings that
say something about the model are handed back to the caller.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import onnx
import torch
from torch import nn

from graphtricks.errors import ExportError, ValidationError
from graphtricks.onnx.eager import reference_copy

__all__ = ["export_mode"]


def _is_noise(w: warnings.WarningMessage) -> bool:
    """Warnings every TorchScript export emits, which say nothing about this model."""
    text, torch_dir = str(w.message), os.path.dirname(torch.__file__)
    from_torch = w.filename.startswith(torch_dir)
    if issubclass(w.category, (DeprecationWarning, FutureWarning)):
        return from_torch or "TorchScript-based ONNX export" in text
    if "num_batches_tracked" in text and "Removing mutation" in text:
        return True  # the counter's in-place increment is dropped, as it should be
    # torch.nn.functional's own argument checks (BatchNorm's batch-size check) trip the tracer
    return from_torch and w.filename.endswith(os.path.join("nn", "functional.py"))


@contextlib.contextmanager
def _silenced_output() -> Iterator[None]:
    """Discards what C++ code writes to file descriptors 1 and 2 while the block runs.

    The exporter turns its ONNX log on whatever the caller asked (its ``setup_onnx_logging``
    tests a function object for truth) and prints the whole Torch IR graph to stdout when an
    operator cannot be exported; the library never prints.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        with tempfile.TemporaryFile() as sink:
            for fd in saved:
                os.dup2(sink.fileno(), fd)
            try:
                yield
            finally:
                for fd, copy in saved.items():
                    os.dup2(copy, fd)
    finally:
        for copy in saved.values():
            os.close(copy)


def _first_line(error: BaseException) -> str:
    """The gist of an exporter error: its first line, without torch's boilerplate tail."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    for tail in (" Please feel free to request support", " [Caused by"):
        line = line.split(tail)[0]
    return line.strip()


def export_mode(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], *, train: bool, opset: int, **kwargs: Any
) -> tuple[onnx.ModelProto, list[str]]:
    """Exports a deep copy of ``model`` in train or eval mode to an in-memory ONNX model.

    Args:
        model: The model; it is not touched (the exporter's trace updates BatchNorm running
            stats, which is why a copy is exported).
        inputs: The example inputs.
        train: Train mode (``TrainingMode.TRAINING``) or eval mode.
        opset: The ONNX opset.
        **kwargs: ``input_names``, ``output_names``, ``dynamic_axes`` for ``torch.onnx.export``.

    Returns:
        The graph, and the distinct warnings worth showing, each
        ``"<Category> at <file>:<line>: <first sentence>"``.

    Raises:
        ExportError: The model cannot be copied or the exporter failed.
    """
    mode = "train" if train else "inference"
    try:
        twin = reference_copy(model, train=train, device="cpu")
    except ValidationError as e:
        raise ExportError(str(e)) from e
    buffer = io.BytesIO()
    training = torch.onnx.TrainingMode.TRAINING if train else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        try:
            with _silenced_output():
                torch.onnx.export(
                    twin, inputs, buffer, dynamo=False, training=training, opset_version=opset,
                    do_constant_folding=False,  # folding would merge weights differently per mode
                    **kwargs,
                )
        except Exception as e:
            raise ExportError(
                f"TorchScript ONNX export of the {mode} graph failed: {_first_line(e)}"
            ) from e
    shown = list(dict.fromkeys(_describe(w) for w in recorded if not _is_noise(w)))
    return onnx.load_from_string(buffer.getvalue()), shown


def _describe(w: warnings.WarningMessage) -> str:
    """``"TracerWarning at model.py:29: <first sentence>"``: where in the model, and what."""
    text = (str(w.message).strip().splitlines() or [""])[0]
    first = text.split(". ")[0].rstrip(".")
    return f"{w.category.__name__} at {os.path.basename(w.filename)}:{w.lineno}: {first}"
