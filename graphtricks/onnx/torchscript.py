"""One call of torch's TorchScript ONNX exporter, made quiet and with readable errors.

The exporter is deprecated but is the only one that exports train-mode BatchNorm with batch
statistics; its deprecation warnings are dropped here and nowhere else, and the warnings that
say something about the model are handed back to the caller.

What is exported is a copy of the model made ready for tracing:

- its ``forward`` takes the inputs positionally and nothing else (``forward(*inputs)``): the
  exporter otherwise appends every defaulted parameter of the real signature to the inputs,
  positionally (``torch.onnx.utils._decide_input_format``). That turns an fx graph's
  ``is_causal=False`` into a traced tensor (``aten::eq(Tensor, bool)``: an internal assert in
  alias analysis), and fills a Hugging Face model's ``use_cache`` slot with None while
  transformers' ``merge_with_config_defaults``, which cannot see positional slots through the
  decorators under it, adds ``use_cache`` from the config by keyword ("got multiple values").
  The copy's real forward is called with the inputs alone, as validation calls the model, and
  its output is flattened as validation flattens it (``eager.flatten_outputs``: a
  ``ModelOutput``'s tensors in key order; a ``Cache`` object is no tensor and no output);
- its fx ``GraphModule`` regions lose their guard nodes (``torch._assert``,
  ``_assert_is_none``): they check that an eager call keeps the shapes and constant arguments
  the graph was traced with, which a traced graph cannot express (the tracer only warns).

Channel dropout (``nn.Dropout1d/2d/3d``, ``aten::feature_dropout``) has no train-mode symbolic
in the exporter; one is registered for the duration of each export (:func:`feature_dropout`), as
are ``F.fold`` (:func:`col2im`), ``torch.diff`` (:func:`diff`, which the exporter lacks) and
``torch.cumsum`` (:func:`cumsum`: the exporter's sums bools and small integers in their own
type, which ONNX Runtime refuses); the list is ``_SYMBOLICS``.
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

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.onnx.symbolic_helper import parse_args

from graphtricks.errors import ExportError, ValidationError
from graphtricks.onnx.eager import flatten_outputs, reference_copy
from graphtricks.onnx.weights import WeightTable, attach_state, is_stub, tensor_value

__all__ = [
    "describe_warning", "export_mode", "export_notes", "feature_dropout", "first_line", "fx_guards",
    "silenced_output", "strip_fx_guards",
]

# torch._assert is what fx traces `assert` and timm's `_assert` into; _assert_is_none guards a
# concrete_args value of None.
_GUARDS = tuple(
    g for g in (torch._assert, getattr(torch.fx._symbolic_trace, "_assert_is_none", None)) if g
)


_FEATURE_DROPOUT_OPS = ("aten::feature_dropout", "aten::feature_dropout_")


@parse_args("v", "f", "b")
def feature_dropout(g: Any, data: Any, p: float, train: bool) -> Any:
    """The ONNX form of channel dropout: ``data * Dropout(ones(N, C, 1, ..., 1), p)``.

    A Dropout on a tensor of ones shaped like one value per (sample, channel) gives the mask
    already scaled by ``1 / (1 - p)``; broadcast over the other dimensions it zeroes whole
    channels, as ``aten::feature_dropout`` does. Keeping an ONNX Dropout (rather than drawing the
    mask with RandomUniformLike) lets validation count it, neutralise it (ratio 0 gives ones)
    and measure its keep rate on the mask itself (:mod:`graphtricks.onnx.train_only` tells
    this *mask Dropout* from a Dropout of data).
    """
    if not train:
        return data  # eval mode: the identity, as the exporter's own symbolic does

    def const(value: Any, dtype: torch.dtype) -> Any:
        return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))

    shape = g.op("Shape", data)
    batch_channels = g.op("Slice", shape, const([0], torch.int64), const([2], torch.int64))
    other_dims = g.op("Sub", g.op("Shape", shape), const([2], torch.int64))  # rank - 2
    ones_tail = g.op("ConstantOfShape", other_dims, value_t=torch.ones(1, dtype=torch.int64))
    mask_shape = g.op("Concat", batch_channels, ones_tail, axis_i=0)
    dtype = data.type().dtype() or torch.float32
    ones = g.op("ConstantOfShape", mask_shape, value_t=torch.ones(1, dtype=dtype))
    mask, _ = g.op(
        "Dropout", ones, const(p, torch.float32), const(True, torch.bool), outputs=2
    )
    return g.op("Mul", data, mask)


@parse_args("v", "v", "is", "is", "is", "is")
def col2im(g: Any, data: Any, output_size: Any, kernel_size: list, dilation: list, padding: list, stride: list) -> Any:
    """``F.fold`` as ONNX ``Col2Im`` (opset 18), with the spatial rank taken from the kernel.

    torch's own symbolic reads the rank from the output size's type, which the exporter does not
    know when constants are not folded (timm ``volo``: "'NoneType' object is not subscriptable").
    ONNX lists pads as every axis's begin, then every axis's end.
    """
    rank = len(kernel_size)
    kernel = g.op("Constant", value_t=torch.tensor(kernel_size, dtype=torch.int64))
    return g.op(
        "Col2Im", data, output_size, kernel,
        dilations_i=list(dilation) or [1] * rank,
        pads_i=(list(padding) * 2) if padding else [0] * (2 * rank),
        strides_i=list(stride) or [1] * rank,
    )


def _is_none(value: Any) -> bool:
    """Whether an optional argument of a symbolic was not given (a traced ``None``)."""
    return value is None or value.node().mustBeNone()


def _onnx_type(dtype: torch.dtype) -> int | None:
    """The ONNX element type of a torch dtype, else None (complex, float8...)."""
    if dtype == torch.bfloat16:
        return onnx.TensorProto.BFLOAT16
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(torch.empty((), dtype=dtype).numpy().dtype)
    except (TypeError, KeyError, ValueError, RuntimeError):
        return None


@parse_args("v", "i", "i", "v", "v")
def diff(g: Any, data: Any, n: int, dim: int, prepend: Any, append: Any) -> Any:
    """``torch.diff(data, n, dim, prepend, append)``: ``n`` times ``x[1:] - x[:-1]`` along ``dim``.

    ``prepend`` and ``append`` are concatenated before and after ``data`` along ``dim`` first,
    all promoted to one dtype as ``torch.cat`` does; bool tensors differ by ``!=`` (``Xor``), as
    in torch. Slices past the end come out empty, so an ``n`` at least the length gives an empty
    dimension; ``n = 0`` gives the input alone, as in torch. transformers' masks call it on position
    ids (``find_packed_sequence_indices``), which made every Llama-style model fail to export.

    Raises:
        torch.onnx.errors.SymbolicValueError: (as an ExportError) ``n`` is negative, the input is
            0-d, ``dim`` is out of range, a piece has another rank, or a dtype is unknown.
    """
    from torch.onnx.errors import SymbolicValueError

    def refuse(why: str) -> None:
        raise SymbolicValueError(f"graphtricks cannot export torch.diff: {why}", data)

    if n < 0:
        refuse(f"order n must be non-negative, got {n}")
    if n == 0:
        return data  # torch returns the input as it is, without prepend and append
    pieces = [p for p in (prepend, data, append) if not _is_none(p)]
    ranks = [p.type().dim() for p in pieces]
    rank = data.type().dim()
    if rank is not None and rank == 0:
        refuse("the input is 0-d (torch needs at least one dimension)")
    if rank is not None and not -rank <= dim < rank:
        refuse(f"dim {dim} is out of range for a {rank}-d input")
    if any(r is not None and rank is not None and r != rank for r in ranks):
        refuse(f"prepend/append must have the input's rank {rank}, got ranks {ranks}")
    dtypes = [p.type().dtype() for p in pieces]
    if any(d is None for d in dtypes):
        refuse("the dtype of its input, prepend or append is not known while tracing")
    result = dtypes[0]
    for d in dtypes[1:]:
        result = torch.promote_types(result, d)
    if any(d != result for d in dtypes):
        to = _onnx_type(result)
        if to is None:
            refuse(f"cannot cast its pieces to {result}")
        pieces = [p if d == result else g.op("Cast", p, to_i=to) for p, d in zip(pieces, dtypes)]
    x = pieces[0] if len(pieces) == 1 else g.op("Concat", *pieces, axis_i=dim)

    def const(values: list[int]) -> Any:
        return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))

    axes, big = const([dim]), const([torch.iinfo(torch.int64).max])
    for _ in range(n):
        later = g.op("Slice", x, const([1]), big, axes)
        earlier = g.op("Slice", x, const([0]), const([-1]), axes)
        x = g.op("Xor" if result == torch.bool else "Sub", later, earlier)
    return x


@parse_args("v", "i", "none")
def cumsum(g: Any, data: Any, dim: int, dtype: Any = None) -> Any:
    """``torch.cumsum`` in the dtype torch gives it: ``CumSum`` of the input cast to it first.

    torch sums bool and integer tensors as int64 (or in ``dtype=``); ONNX ``CumSum`` has no bool
    or small-integer kernel, and torch's own symbolic casts only for a ``dtype`` that is not a
    constant, so ``(mask != 1).cumsum(-1)`` (transformers' packed-sequence masks) gave ONNX
    Runtime a bool CumSum it refuses to load. The target dtype is read from the traced node's
    output: the exporter knows it whenever it knows the input's.
    """
    from torch.onnx.errors import SymbolicValueError

    out_type = g.original_node.output().type()
    want = out_type.dtype() if hasattr(out_type, "dtype") else None
    have = data.type().dtype()
    if want is None and have is not None and have.is_floating_point and _is_none(dtype):
        want = have
    if want is None:
        raise SymbolicValueError(
            "graphtricks cannot export torch.cumsum: its result dtype is not known while tracing",
            data,
        )
    if want != have:
        to = _onnx_type(want)
        if to is None:
            raise SymbolicValueError(f"graphtricks cannot export torch.cumsum in {want}", data)
        data = g.op("Cast", data, to_i=to)
    axis = g.op("Constant", value_t=torch.tensor(dim, dtype=torch.int64))
    return g.op("CumSum", data, axis)


# graphtricks' symbolics: (aten op, function, first opset it applies to)
_SYMBOLICS = (
    *((name, feature_dropout, 1) for name in _FEATURE_DROPOUT_OPS),
    ("aten::col2im", col2im, 18),
    ("aten::diff", diff, 11),  # Slice and Concat with negative axes
    ("aten::cumsum", cumsum, 11),  # CumSum is opset 11
)


@contextlib.contextmanager
def _graphtricks_symbolics(opset: int) -> Iterator[None]:
    """Registers graphtricks' symbolics (``_SYMBOLICS``) for ``opset`` while the block runs.

    Registration is global to torch, so it is undone on exit: the exporter's behaviour outside
    graphtricks stays as torch ships it.
    """
    registered = [name for name, fn, first in _SYMBOLICS if opset >= first]
    for name, fn, first in _SYMBOLICS:
        if opset >= first:
            torch.onnx.register_custom_op_symbolic(name, fn, opset)
    try:
        yield
    finally:
        for name in registered:
            torch.onnx.unregister_custom_op_symbolic(name, opset)


# Floating-point parameters at least this large are weights: shape inference reads their types only.
_WEIGHT_BYTES = 1024


@contextlib.contextmanager
def _shape_inference_on_types() -> Iterator[None]:
    """Hands the exporter's graph-level shape inference only the parameters whose values it uses.

    torch's pass puts every parameter it is given into the one-node graph it serializes for
    ONNX's shape inference of each node (``CloneNodeToGraph``): a copy of every weight, twice per
    export, 3 of the 5 s of exporting a 403 MB MLP. Values matter only where they are shapes,
    axes, indices or scales: integer tensors and small ones, all kept; a weight's node is
    inferred from its type, which the trace recorded. The graph written is the same.
    """
    full = torch._C._jit_pass_onnx_graph_shape_type_inference

    def on_types(graph: Any, params_dict: dict[str, torch.Tensor], opset: int) -> None:
        kept = {
            k: v for k, v in params_dict.items()
            if not (v.is_floating_point() and v.numel() * v.element_size() >= _WEIGHT_BYTES)
        }
        return full(graph, kept, opset)

    torch._C._jit_pass_onnx_graph_shape_type_inference = on_types
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = full


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
def silenced_output() -> Iterator[None]:
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


def first_line(error: BaseException) -> str:
    """The gist of an exporter error: its first line, without torch's boilerplate tail."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    for tail in (" Please feel free to request support", " [Caused by"):
        line = line.split(tail)[0]
    return line.strip()


def fx_guards(model: nn.Module) -> list[tuple[torch.fx.GraphModule, torch.fx.Node]]:
    """The guard nodes (``torch._assert``, ``_assert_is_none``) of every fx region of ``model``."""
    return [
        (module, node)
        for module in model.modules()
        if isinstance(module, torch.fx.GraphModule)
        for node in module.graph.nodes
        if node.op == "call_function" and node.target in _GUARDS
    ]


def strip_fx_guards(model: nn.Module) -> None:
    """Removes every fx guard, and what only computed its condition, from ``model`` in place."""
    edited, erased = {}, set()
    for module, guard in fx_guards(model):
        pending = list(guard.all_input_nodes)
        module.graph.erase_node(guard)
        edited[id(module)] = module
        while pending:  # the condition's nodes (x.shape, getitem, ==) now compute for nobody
            node = pending.pop()
            pure = node.op in ("call_function", "call_method")
            if pure and not node.users and node not in erased:
                pending += node.all_input_nodes
                module.graph.erase_node(node)
                erased.add(node)
    for module in edited.values():
        module.recompile()


def _traceable(twin: nn.Module) -> None:
    """Gives ``twin`` (a copy) ``forward(*inputs)``, returning a flat tuple of tensors."""
    strip_fx_guards(twin)  # first: recompiling replaces a GraphModule's forward
    forward = twin.forward  # the class's forward, bound

    def flat_forward(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(flatten_outputs(forward(*inputs)))

    twin.forward = flat_forward  # an instance attribute: Module.__call__ (hooks) still wraps it


def export_notes(model: nn.Module) -> list[str]:
    """What a user of the files must know about how the model was traced."""
    notes = []
    guards = fx_guards(model)
    if guards:
        notes.append(
            f"both graphs were exported without the {len(guards)} fx guard node(s) "
            "(torch._assert, e.g. input-size checks) of the model's traced regions: they only "
            "check eager calls"
        )
    return notes


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers by qualified name (first name of a shared tensor)."""
    return dict(model.named_parameters()) | dict(model.named_buffers())


def _twin_or_model(
    copy: nn.Module, twin_role: str, inputs: tuple[torch.Tensor, ...], kwargs: dict[str, Any],
    extra_outputs: list[str] | None,
) -> nn.Module:
    """The twin of ``copy`` to export (its ``updated.*`` outputs named in ``kwargs`` and
    ``extra_outputs``), or ``copy`` itself where the twin cannot express the model (made portable
    after export)."""
    from graphtricks.onnx.twin import make_twin, updated_names

    twin, twin_mode = make_twin(copy, mc=twin_role == "mc")
    try:
        with torch.no_grad():
            twin(*inputs)  # registers the sites before the trace, so that scopes name them
    except NotImplementedError as e:
        if twin_role == "mc":
            raise ExportError(f"cannot export the MC-dropout graph: {e}") from e
        return copy
    more = updated_names(twin_mode)
    kwargs["output_names"] = list(kwargs.get("output_names") or []) + more
    if extra_outputs is not None:
        extra_outputs += more
    return twin


def export_mode(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    *,
    train: bool,
    opset: int,
    table: WeightTable | None = None,
    updated: list[str] | None = None,
    twin_role: str | None = None,
    extra_outputs: list[str] | None = None,
    **kwargs: Any,
) -> tuple[onnx.ModelProto, list[str]]:
    """Exports a copy of ``model`` in train or eval mode to an in-memory ONNX model.

    The exporter writes the graph without weights; they are added afterwards from ``model``
    itself (:func:`graphtricks.onnx.weights.attach_state`), so the graph carries the model's
    values from before the export trace, and, with a ``table``, large ones as stubs on views
    of the model's tensors: no copy of the weights is made.

    Args:
        model: The model; it is not touched (the exporter's trace updates BatchNorm running
            stats, which is why a copy with its own buffers is exported).
        inputs: The example inputs.
        train: Train mode (``TrainingMode.TRAINING``) or eval mode.
        opset: The ONNX opset.
        table: Holds the large weights; None: every weight goes into the graph.
        updated: Receives the names of the buffers the export trace changed (their
            pre-export values are the ones exported).
        twin_role: ``"train"``, ``"infer"`` or ``"mc"``: exports that twin (:mod:`graphtricks.onnx.twin`) of the
            model in its mode instead of the model, its running statistics as outputs after
            ``output_names`` (their names go to ``extra_outputs``).
        extra_outputs: Receives the names of a twin's ``updated.*`` outputs.
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
    if twin_role is not None:
        twin = _twin_or_model(twin, twin_role, inputs, kwargs, extra_outputs)
    _traceable(twin)
    buffer = io.BytesIO()
    training = torch.onnx.TrainingMode.TRAINING if train else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        try:
            with silenced_output(), _graphtricks_symbolics(opset), _shape_inference_on_types():
                torch.onnx.export(
                    twin, inputs, buffer, dynamo=False, training=training, opset_version=opset,
                    do_constant_folding=False,  # folding would merge weights differently per mode
                    export_params=False,  # weights are added from the model (attach_state)
                    **kwargs,
                )
        except Exception as e:
            raise ExportError(
                f"TorchScript ONNX export of the {mode} graph failed: {first_line(e)}"
            ) from e
    shown = list(dict.fromkeys(describe_warning(w) for w in recorded if not _is_noise(w)))
    graph = onnx.load_from_string(buffer.getvalue())
    state = {
        k: v for k, v in _state(model).items() if v.device.type != "meta"
    }
    if updated is not None:
        after = dict(twin.named_buffers())
        updated += [
            k for k, v in model.named_buffers()
            if k in after and v.shape == after[k].shape and not torch.equal(v, after[k])
        ]
    own = WeightTable() if table is None else None
    try:
        missing = attach_state(graph, len(inputs), state, table if table is not None else own)
        if own is not None:  # no table to hold views: the weights go into the graph
            for init in graph.graph.initializer:
                if is_stub(init):
                    init.CopyFrom(numpy_helper.from_array(np.array(tensor_value(init)), init.name))
    finally:
        if own is not None:
            own.close()
    if missing:
        raise ExportError(
            f"the {mode} graph reads weights {missing[:3]} that are not parameters or buffers "
            "of the model; register them as buffers"
        )
    return graph, shown


def describe_warning(w: warnings.WarningMessage) -> str:
    """``"TracerWarning at model.py:29: <first sentence>"``: where in the model, and what."""
    text = (str(w.message).strip().splitlines() or [""])[0]
    first = text.split(". ")[0].rstrip(".")
    return f"{w.category.__name__} at {os.path.basename(w.filename)}:{w.lineno}: {first}"
