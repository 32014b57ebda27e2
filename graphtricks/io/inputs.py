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
    "DTYPES",
    "DTYPE_NAMES",
    "MASK_INPUTS",
    "VALUED_INPUTS",
    "check_inputs_agree",
    "make_example_inputs",
    "make_keyword_inputs",
    "make_valued_input",
    "padded_masks",
    "parse_input_shapes",
    "parse_named_input",
    "positional_names",
    "value_limits",
]

DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "int64", "int32")


def _end_padded(shape: tuple[int, ...], trailing: int) -> torch.Tensor:
    """A 0/1 mask valid on a prefix of its ``trailing`` last dimensions in each row, padded after.

    Rows are the leading dimensions. Row 0 is not padded; the others are padded at the end, each
    to its own length (as far as the size allows), from just under the full size down to half
    of it, or lower when there are more rows than that leaves lengths (a batch of sentences of
    different lengths). A single row is padded to half: a padded position is what tests a mask.
    """
    import torch

    sizes, lead = shape[-trailing:], shape[:-trailing]
    rows = 1
    for d in lead:
        rows *= d
    mask = torch.zeros((rows, *sizes), dtype=torch.bool)
    for r in range(rows):
        index = []
        for n in sizes:
            short = max(1, min(n // 2, n - (rows - 1)))
            # row 1 the longest padded row (n - 1), the last the shortest (short)
            keep = n if r == 0 and rows > 1 else short + ((n - 1 - short) * (rows - 1 - r)) // max(rows - 2, 1)
            index.append(slice(0, max(keep, 1)))
        mask[(r, *index)] = True
    return mask.reshape(shape)


def _sequence_mask(shape, dtype, high: int, gen) -> torch.Tensor:
    """``attention_mask``: 1 for tokens, 0 for the padding at the end of shorter rows."""
    return _end_padded(tuple(shape), 1).to(dtype)


def _pixel_mask(shape, dtype, high: int, gen) -> torch.Tensor:
    """``pixel_mask``: 1 on each image's top-left region, 0 on the padding below and right of it."""
    return _end_padded(tuple(shape), min(2, len(shape))).to(dtype)


def _token_types(shape, dtype, high: int, gen) -> torch.Tensor:
    """``token_type_ids``: segment 0 then segment 1, split at a seeded place in each row; all 0
    when the model has one segment type only (``high`` = 1, RoBERTa's ``type_vocab_size``)."""
    import torch

    length = shape[-1]
    splits = torch.randint(1, max(length, 2), (*shape[:-1], 1), generator=gen)
    second = torch.arange(length) >= splits
    return (second * min(1, max(high - 1, 0))).to(dtype)


def _positions(shape, dtype, high: int, gen) -> torch.Tensor:
    """``position_ids``: 0, 1, 2, ... along the sequence, the same in every row."""
    import torch

    return torch.arange(shape[-1]).expand(tuple(shape)).to(dtype).contiguous()


# Inputs named as Hugging Face names them whose values have a meaning: made valid, not random.
VALUED_INPUTS = {
    "attention_mask": _sequence_mask,
    "decoder_attention_mask": _sequence_mask,
    "pixel_mask": _pixel_mask,
    "token_type_ids": _token_types,
    "position_ids": _positions,
}
# The masks among them: a 0 is a padded position.
MASK_INPUTS = frozenset({"attention_mask", "decoder_attention_mask", "pixel_mask"})


def make_valued_input(name: str | None, shape, dtype, seed: int = 0, high: int = 2) -> torch.Tensor | None:
    """The input ``name`` as deployment sends it (:data:`VALUED_INPUTS`), or None for other names.

    Args:
        name: The input's name (a forward parameter, an ONNX graph input).
        shape: Its shape; rank 0 is left to the caller.
        dtype: A torch dtype: masks are 0/1 in it (``True``/``False`` for bool).
        seed: Seeds what varies (where segment 1 starts).
        high: One above the largest valid value (segment types: ``type_vocab_size``).
    """
    import torch

    rule = VALUED_INPUTS.get(name or "")
    if rule is None or not len(shape) or 0 in tuple(shape):
        return None
    return rule(tuple(shape), dtype, high, torch.Generator().manual_seed(seed))


def value_limits(model) -> dict[str, int]:
    """One above the largest valid value of the :data:`VALUED_INPUTS` a model's config bounds:
    ``{"token_type_ids": type_vocab_size}`` for a Hugging Face config that has one."""
    types = getattr(getattr(model, "config", None), "type_vocab_size", None)
    return {"token_type_ids": types} if isinstance(types, int) and types > 0 else {}


def padded_masks(names, tensors) -> list[str]:
    """The mask inputs (:data:`MASK_INPUTS`) among ``names`` holding a padded position."""
    return [n for n, t in zip(names, tensors) if n in MASK_INPUTS and t.numel() and bool((t == 0).any())]


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
    shapes: list[tuple[int, ...]], dtype: str = "float32", seed: int = 0, device: str = "cpu", high: int = 100,
    names: list[str] | None = None, highs: dict[str, int] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Seeded random inputs: normal floats, or integers in ``[0, high)`` for token ids.

    With ``names`` (the forward's parameters, :func:`positional_names`), an input named as in
    :data:`VALUED_INPUTS` gets its valid values instead (``highs`` bounds them by name).
    """
    import torch

    if dtype not in DTYPE_NAMES:
        raise InputShapeError(f"unknown input dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(shapes):
        name = names[i] if names and i < len(names) else None
        valued = make_valued_input(name, shape, torch_dtype, seed + i, (highs or {}).get(name or "", 2))
        if valued is not None:
            t = valued
        elif torch_dtype.is_floating_point:
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
    specs: dict[str, str], dtype: str = "float32", seed: int = 1, device: str = "cpu", high: int = 100,
    highs: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Seeded random keyword inputs from ``{name: "SHAPE[:DTYPE]"}`` (``dtype`` where none is given).

    Each input draws from its own seed (``seed`` + its position), so one input's shape does not
    change the values of the next. Inputs named as in :data:`VALUED_INPUTS` get valid values: 0/1 masks padded at the end of
    all rows but the first, segment ids 0 then 1 (0 only when ``highs`` says one type), positions.

    Args:
        highs: one above the largest valid value per input name (``{"token_type_ids": 1}``).
    """
    import torch

    out = {}
    for i, (name, text) in enumerate(specs.items()):
        _, shape, own = parse_named_input(f"{name}={text}")
        valued = make_valued_input(name, shape, getattr(torch, own or dtype), seed + i, (highs or {}).get(name, 2))
        if valued is not None:
            out[name] = valued.to(device)
        else:
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
    names = positional_names(forward)
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


def positional_names(forward) -> list[str]:
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
