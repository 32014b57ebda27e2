"""Example inputs: shapes as users write them (``8,3,32,32;8,16``), dtypes by name, seeded tensors.

torch is imported only where tensors are made, so the command line can check a shape before
it pays for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from graphtricks.errors import InputShapeError

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPES", "DTYPE_NAMES", "make_example_inputs", "parse_input_shapes"]

DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "int64", "int32")


def __getattr__(name: str):
    if name == "DTYPES":  # name -> torch dtype, built on first use
        import torch

        return {n: getattr(torch, n) for n in DTYPE_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_input_shapes(text: str) -> list[tuple[int, ...]]:
    """Parse ``"8,3,32,32"`` or ``"8,16;8,16"`` (one shape per model input).

    Dimensions are separated by commas only: ``8x3x32x32`` is refused with the comma form
    to use, so one spelling is written into recipes and shown everywhere.

    Raises:
        InputShapeError: a dimension is not a positive integer, or a shape is empty.
    """
    shapes = []
    for part in text.split(";"):
        dims = [d.strip() for d in part.split(",")]
        if not part.strip() or any(not d.isdigit() or int(d) <= 0 for d in dims):
            if "x" in part.lower():
                raise InputShapeError(
                    f"input shape {part.strip()!r}: separate dimensions with commas, as in"
                    f" {part.strip().lower().replace('x', ',')}"
                )
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
    import torch

    if dtype not in DTYPE_NAMES:
        raise InputShapeError(f"unknown input dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if torch_dtype.is_floating_point:
            t = torch.randn(shape, generator=gen).to(torch_dtype)
        else:
            t = torch.randint(0, high, shape, generator=gen, dtype=torch_dtype)
        out.append(t.to(device))
    return tuple(out)
