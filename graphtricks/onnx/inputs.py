"""Validation inputs: random tensors shaped like the examples, and feeds checked against a graph."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from graphtricks.errors import ValidationError
from graphtricks.io.inputs import make_valued_input

__all__ = ["InputSet", "as_input_tuple", "random_like", "session_feed"]

# ONNX Runtime spells input types as strings; numpy has no bfloat16, so bf16 inputs are refused.
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class InputSet:
    """One set of inputs: a label for messages, the seed that drew it (None if given)."""

    label: str
    seed: int | None
    tensors: tuple[torch.Tensor, ...]


def as_input_tuple(inputs: Any, what: str, error: type[Exception]) -> tuple[torch.Tensor, ...]:
    """Checks that ``inputs`` is a tensor or a tuple/list of tensors and returns a tuple.

    Args:
        inputs: What the caller passed.
        what: How to name the inputs in the message (``"example_inputs"``).
        error: The exception class to raise.

    Returns:
        The inputs as a tuple of tensors.

    Raises:
        error: Something other than tensors was passed, or nothing at all.
    """
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if not isinstance(inputs, (tuple, list)) or not inputs:
        raise error(f"{what} must be a non-empty tuple of tensors, got {type(inputs).__name__}")
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise error(f"{what}[{i}] must be a tensor, got {type(t).__name__}")
    return tuple(inputs)


def random_like(
    examples: Sequence[torch.Tensor],
    seed: int,
    batch_size: int | None = None,
    names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Random inputs with the shapes and dtypes of ``examples``, reproducible from ``seed``.

    Floating-point inputs are standard normal; integer inputs (token ids, indices) are drawn in
    ``[0, max(example) + 1)`` so they stay valid indices; bool inputs are fair coin flips.
    Inputs named as Hugging Face names them (:data:`~graphtricks.io.inputs.VALUED_INPUTS`)
    get valid values instead: 0/1 masks padded at the end of every row but the first, segment
    ids 0 then 1 (no higher than the example's), positions 0, 1, 2, ...

    Args:
        examples: The example inputs.
        seed: Seeds a private generator: the global RNG is left alone.
        batch_size: When given, replaces dimension 0 of every input of rank >= 1.
        names: The inputs' names (the graph's input names), to recognise those with a meaning.

    Returns:
        The inputs, on CPU.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, example in enumerate(examples):
        shape = list(example.shape)
        if batch_size is not None and shape:
            shape[0] = batch_size
        high = int(example.max()) + 1 if example.numel() and not example.dtype.is_floating_point else 2
        valued = make_valued_input(names[i] if names and i < len(names) else None, shape, example.dtype,
                                   seed + i, high)
        if valued is not None:
            out.append(valued)
            continue
        if example.dtype.is_floating_point:
            t = torch.randn(shape, generator=gen, dtype=torch.float32).to(example.dtype)
        elif example.dtype == torch.bool:
            t = torch.randint(0, 2, shape, generator=gen).bool()
        else:
            high = int(example.max()) + 1 if example.numel() else 1
            t = torch.randint(0, max(high, 1), shape, generator=gen, dtype=example.dtype)
        out.append(t)
    return tuple(out)


def session_feed(session: Any, inputs: Sequence[torch.Tensor], label: str) -> dict[str, np.ndarray]:
    """Checks ``inputs`` against a session's inputs and returns the feed dict.

    Args:
        session: An ``onnxruntime.InferenceSession``.
        inputs: One tensor per graph input, in order.
        label: Names the input set in messages (``"seed=0"``).

    Returns:
        ``{graph input name: numpy array}``.

    Raises:
        ValidationError: Wrong number of inputs, or an input of the wrong dtype, rank or size.
    """
    graph_inputs = session.get_inputs()
    if len(inputs) != len(graph_inputs):
        raise ValidationError(
            f"{label}: the ONNX graph takes {len(graph_inputs)} input(s) "
            f"({', '.join(i.name for i in graph_inputs)}), got {len(inputs)}; "
            "pass the same inputs as at export"
        )
    feed = {}
    for spec, tensor in zip(graph_inputs, inputs):
        want = _ORT_TYPES.get(spec.type)
        if tensor.dtype == torch.bfloat16 or want is None:
            raise ValidationError(
                f"{label}: input '{spec.name}' has type {spec.type} / {tensor.dtype}, "
                "which numpy cannot carry; validate with float32 or float16 inputs"
            )
        array = tensor.detach().cpu().numpy()
        if array.dtype != want:
            raise ValidationError(
                f"{label}: input '{spec.name}' is {array.dtype}, the ONNX graph expects "
                f"{np.dtype(want)}; pass inputs of the dtype used at export"
            )
        shape = list(spec.shape)
        if len(shape) != array.ndim or any(
            isinstance(d, int) and d != n for d, n in zip(shape, array.shape)
        ):
            raise ValidationError(
                f"{label}: input '{spec.name}' has shape {tuple(array.shape)}, the ONNX graph "
                f"expects {tuple(shape)}; pass inputs of the shape used at export"
            )
        feed[spec.name] = array
    return feed
