"""Example inputs: shapes as users write them (``8,3,32,32;8,16``), dtypes by name, seeded tensors.

torch is imported only where tensors are made, so the command line can check a shape before
it pays for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from graphtricks.errors import InputShapeError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPES", "DTYPE_NAMES", "check_inputs_agree", "make_example_inputs", "make_keyword_inputs", "parse_input_shapes",
    "parse_named_input",
]

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


def parse_named_input(text: str) -> tuple[str, tuple[int, ...], str | None]:
    """Parse one keyword input ``NAME=SHAPE[:DTYPE]`` (``attention_mask=8,128:int64``).

    Returns:
        ``(name, shape, dtype)``; dtype is None when not given.

    Raises:
        InputShapeError: no ``NAME=``, a name that is no identifier, a malformed shape or an unknown dtype.
    """
    name, eq, rest = text.partition("=")
    name = name.strip()
    if not eq or not name.isidentifier():
        raise InputShapeError(f"keyword input {text!r}: write NAME=SHAPE[:DTYPE], e.g. attention_mask=8,128:int64")
    shape_text, colon, dtype = rest.partition(":")
    dtype = dtype.strip() if colon else None
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise InputShapeError(f"keyword input {name}: unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    shapes = parse_input_shapes(shape_text)
    if len(shapes) != 1:
        raise InputShapeError(f"keyword input {name}: one shape per --input (got {shape_text.strip()!r})")
    return name, shapes[0], dtype


def make_keyword_inputs(
    specs: dict[str, str], dtype: str = "float32", seed: int = 1, device: str = "cpu", high: int = 100
) -> dict[str, torch.Tensor]:
    """Seeded random keyword inputs from ``{name: "SHAPE[:DTYPE]"}`` (``dtype`` where none is given).

    Each input draws from its own seed (``seed`` + its position), so one input's shape does not
    change the values of the next.
    """
    out = {}
    for i, (name, text) in enumerate(specs.items()):
        _, shape, own = parse_named_input(f"{name}={text}")
        out[name] = make_example_inputs([shape], own or dtype, seed=seed + i, device=device, high=high)[0]
    return out


def named_input_text(shape, dtype) -> str:
    """``"8,128:int64"``: a keyword input's shape and dtype as :func:`parse_named_input` reads them."""
    return ",".join(str(d) for d in shape) + ":" + str(dtype).replace("torch.", "")


def positional_inputs(forward, args: tuple, kwargs: dict) -> tuple[tuple, list[str]]:
    """Keyword inputs moved into their places in ``forward``'s parameters, with those names.

    For exporters that take inputs by position (``torch.onnx.export``): ``f(*args, **kwargs)``
    and ``f(*out)`` make the same call, and the ONNX inputs are named after the parameters
    (``input_ids``, ``attention_mask``). A graphtricks graph takes every input positionally,
    keyword-only ones of the original forward included.

    Raises:
        InputShapeError: a keyword input is no parameter, or comes after a parameter left out
            (it has no position without a value before it) or is keyword-only.
    """
    import inspect

    params = [p for p in inspect.signature(forward).parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    names = [p.name for p in params]
    if not kwargs:
        return tuple(args), names[: len(args)]
    out, used = list(args), []
    for p in params[len(args):]:
        if p.name not in kwargs:
            break
        if p.kind is p.KEYWORD_ONLY:
            raise InputShapeError(f"keyword input {p.name!r} is keyword-only in this forward: it has no position to export at")
        out.append(kwargs[p.name])
        used.append(p.name)
    left = [k for k in kwargs if k not in used]
    if left:
        given = names[: len(out)]
        raise InputShapeError(f"keyword input(s) {', '.join(left)} come after a parameter left out (given: "
                              f"{', '.join(given) or 'none'}; forward takes {', '.join(names)}): pass the ones"
                              " before them too, or fewer keywords")
    return tuple(out), names[: len(out)]


def check_inputs_agree(args: tuple, kwargs: dict, forward=None) -> None:
    """Keyword inputs have the batch of the positional ones, and token inputs their length.

    Inputs of rank ≥ 2 share dimension 0 (the batch; a keyword input of batch 1 broadcasts),
    and integer inputs of rank 2 (token ids, masks: ``(batch, sequence)``) share dimension 1.
    The first positional input of each kind is the reference (the first keyword input when
    there is none). A mismatch would otherwise pass the rewrite and fail later, in the export,
    with the exporter's own message. ``forward`` (optional) names the positional inputs.

    Raises:
        InputShapeError: naming the keyword input, the dimension and the size it should have.
    """
    names = _parameter_names(forward)
    arg_names = [names[i] if i < len(names) else f"input {i}" for i in range(len(args))]
    named = [(n, t, False) for n, t in zip(arg_names, args)] + [(k, t, True) for k, t in kwargs.items()]
    named = [(n, t, kw) for n, t, kw in named if hasattr(t, "shape") and hasattr(t, "dtype")]
    batched = [(n, t, kw) for n, t, kw in named if len(t.shape) >= 2]
    tokens = [(n, t, kw) for n, t, kw in batched if len(t.shape) == 2 and not t.dtype.is_floating_point
              and not t.dtype.is_complex]
    for dim, what, group, spare in ((0, "batch size", batched, 1), (1, "sequence length", tokens, None)):
        if not group:
            continue
        ref_name, ref, _ = group[0]
        for name, t, keyword in group[1:]:
            size, want = int(t.shape[dim]), int(ref.shape[dim])
            if keyword and size != want and size != spare:
                shape = list(t.shape)
                shape[dim] = want
                raise InputShapeError(
                    f"keyword input {name} has {what} {size} (dimension {dim} of {_dims(t.shape)}) but {ref_name} has"
                    f" {want} ({_dims(ref.shape)}); give {name}={_dims(shape)}:{str(t.dtype).replace('torch.', '')}"
                )


def _parameter_names(forward) -> list[str]:
    """The names of ``forward``'s positional parameters (none when it has no signature)."""
    import inspect

    try:
        params = inspect.signature(forward).parameters.values() if forward is not None else []
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _dims(shape) -> str:
    """``2,16``: a shape as users write it."""
    return ",".join(str(int(d)) for d in shape)
