"""Example inputs: shapes as users write them (``8,3,32,32;8,16``), dtypes by name, seeded tensors."""

from __future__ import annotations

import torch

from graphtricks.errors import InputShapeError

__all__ = ["DTYPES", "make_example_inputs", "parse_input_shapes"]

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
}


def parse_input_shapes(text: str) -> list[tuple[int, ...]]:
    """Parse ``"8,3,32,32"`` or ``"8,16;8,16"`` (one shape per model input).

    Raises:
        InputShapeError: a dimension is not a positive integer, or a shape is empty.
    """
    shapes = []
    for part in text.split(";"):
        dims = [d.strip() for d in part.replace("x", ",").split(",")]
        if not part.strip() or any(not d.isdigit() or int(d) <= 0 for d in dims):
            raise InputShapeError(
                f"input shape {part.strip()!r} is not a shape: give positive integers separated by"
                " commas, e.g. 8,3,32,32 (several inputs separated by ';')"
            )
        shapes.append(tuple(int(d) for d in dims))
    return shapes


def make_example_inputs(
    shapes: list[tuple[int, ...]], dtype: str = "float32", seed: int = 0, device: str = "cpu", high: int = 100
) -> tuple[torch.Tensor, ...]:
    """Seeded random inputs: normal floats, or integers in ``[0, high)`` for token ids."""
    if dtype not in DTYPES:
        raise InputShapeError(f"unknown input dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if torch_dtype.is_floating_point:
            t = torch.randn(shape, generator=gen).to(torch_dtype)
        else:
            t = torch.randint(0, high, shape, generator=gen, dtype=torch_dtype)
        out.append(t.to(device))
    return tuple(out)
