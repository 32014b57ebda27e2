"""One graph from torch's ``torch.export``-based ONNX exporter: a twin captured, translated, weighed.

The model (a copy, see :mod:`graphtricks.onnx.twin`) is captured with
``torch.export.export(..., strict=False)`` and translated with ``torch.onnx.export(program)``,
unoptimised. Its weights then become graph inputs before onnxscript's optimizer runs, as the
TorchScript path exports them (``export_params=False``): the optimizer folds no weight (BatchNorm
into a Conv, a transposed copy of a Linear's matrix), so both graphs keep the model's exact
weights under its own names, and :func:`graphtricks.onnx.weights.attach_state` adds them from the
model itself, without a copy.

Where torch.export cannot capture the model (data-dependent control flow), :class:`CaptureFailed`
says why, and the caller falls back to TorchScript. A dimension declared dynamic that the trace
specialises is an :class:`~graphtricks.errors.ExportError` naming it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from graphtricks.errors import ExportError, ValidationError
from graphtricks.onnx.eager import reference_copy
from graphtricks.onnx.names import CONSTANT_PREFIX
from graphtricks.onnx.optimise import optimise
from graphtricks.onnx.portable import name_twin_sites
from graphtricks.onnx.torchscript import first_line, silenced_output, strip_fx_guards
from graphtricks.onnx.twin import make_twin, updated_names
from graphtricks.onnx.weights import TRANSPOSED_SUFFIX, WeightTable, attach_state

__all__ = ["DYNAMO_MIN_OPSET", "CaptureFailed", "dynamic_shapes_for", "export_copy", "export_twin"]

DYNAMO_MIN_OPSET = 18  # the opset torch's torch.export-based exporter writes natively


class CaptureFailed(Exception):
    """torch.export (or the ONNX translation of its program) cannot handle this model."""


def dynamic_shapes_for(
    inputs: Sequence[torch.Tensor], names: Sequence[str], dims: Mapping[str, Sequence[int]]
) -> tuple[dict[int, Any] | None, ...] | None:
    """``torch.export`` dynamic shapes: ``Dim.DYNAMIC`` for each (input name, dimension) in ``dims``.

    torch.export infers each dimension's range and which ones are equal (a mask and its ids share
    the sequence length); one that the code fixes to a size is an error naming it.
    """
    if not dims:
        return None
    return tuple(
        {d: torch.export.Dim.DYNAMIC for d in dims[name]} if dims.get(name) else None
        for name, _ in zip(names, inputs)
    )


def _is_noise(w: warnings.WarningMessage) -> bool:
    """Warnings of torch.export and the ONNX exporter that say nothing about the model."""
    if issubclass(w.category, (DeprecationWarning, FutureWarning, UserWarning)):
        torch_dir = os.path.dirname(torch.__file__)
        return w.filename.startswith(torch_dir) or "site-packages" in w.filename
    return False


def _specialised(error: BaseException, names: Sequence[str]) -> str | None:
    """The dynamic dimensions a failed capture specialised, as torch names them, else None."""
    text = str(error)
    found = re.search(r"Constraints violated \(([^)]*)\)", text)
    if found is None:
        return None
    value = re.search(r"specialized it to be a constant \((\d+)\)", text)
    dims = [  # L['inputs'][0].size()[1]: input 0, dimension 1
        f"{names[int(i)] if int(i) < len(names) else i}:{d}"
        for i, d in re.findall(r"L\['inputs'\]\[(\d+)\]\.size\(\)\[(\d+)\]", text)
    ]
    where = "dimension " + ", ".join(dict.fromkeys(dims)) if dims else found.group(1)
    return where + (f" (fixed to {value.group(1)})" if value else "")


def _capture(twin: nn.Module, inputs: tuple, dynamic: Any, role: str,
             names: Sequence[str]) -> torch.export.ExportedProgram:
    """``torch.export.export(strict=False)`` of the twin, failures sorted out."""
    try:
        # torch.export prints the graph and logs a warning when it cannot capture: the library never prints
        with torch.no_grad(), silenced_output(), _quiet_torch_logs(), \
                contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            # the twin's forward takes *inputs: its one (variadic) argument gets the whole spec
            shapes = None if dynamic is None else (dynamic,)
            return torch.export.export(twin, inputs, dynamic_shapes=shapes, strict=False)
    except Exception as e:  # noqa: BLE001 -- any capture failure falls back, with its reason
        dim = _specialised(e, names)
        if dim is not None and dynamic is not None:
            raise ExportError(
                f"the {role} graph cannot keep {dim} dynamic: the model's code fixes its size; "
                "drop it from --dynamic-dim/--dynamic-batch"
            ) from e
        raise CaptureFailed(f"torch.export cannot capture the {role} graph: {first_line(e)}") from e


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Silences torch's loggers while the block runs (their handlers hold the stream they were
    made with, which no redirection of file descriptors reaches)."""
    import logging

    loggers = [
        logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
        if name == "torch" or name.startswith("torch.")
    ]
    was = [logger.disabled for logger in loggers]
    for logger in loggers:
        logger.disabled = True
    try:
        yield
    finally:
        for logger, disabled in zip(loggers, was):
            logger.disabled = disabled


def _weights_as_inputs(model: Any, state: Mapping[str, torch.Tensor]) -> int:
    """Moves the initializers that are the model's parameters and buffers to graph inputs (after
    the real ones), so no pass folds them; returns how many real inputs there are."""
    graph = model.graph
    n_inputs = len(graph.inputs)
    for name in list(graph.initializers):
        if name in state:
            value = graph.initializers.pop(name)
            value.const_value = None
            graph.inputs.append(value)
    return n_inputs


@functools.lru_cache(maxsize=None)
def _translation_table(opset: int) -> Any:
    """torch's table of ONNX functions for ``opset``, built once per process.

    ``torch.onnx.export`` builds it (``ONNXRegistry.from_torchlib``: every torchlib function's
    ONNX signature) on every call: about 0.4 s on one CPU thread, a quarter of exporting a
    ResNet-18's inference graph. A translation only reads it, so every graph of every export
    in a process shares one.
    """
    from torch.onnx._internal.exporter import _registration

    return _registration.ONNXRegistry.from_torchlib(opset_version=opset)


def _exported(program: torch.export.ExportedProgram, inputs: tuple, opset: int, **names: Any) -> Any:
    """``torch.onnx.export`` of a captured program, unoptimised, with the process's shared table
    where torch's internal entry point that takes one is there (torch 2.14); otherwise the public
    call, which builds its own."""
    try:
        from torch.onnx._internal.exporter import _core

        table = _translation_table(opset)
    except (ImportError, AttributeError):
        return torch.onnx.export(program, inputs, dynamo=True, optimize=False, verbose=False,
                                 opset_version=opset, external_data=False, **names)
    return _core.export(program, inputs, registry=table, optimize=False, verbose=False,
                        opset_version=opset, **names)


def _translate(program: torch.export.ExportedProgram, inputs: tuple, opset: int,
               in_names: Sequence[str], out_names: Sequence[str], role: str) -> Any:
    """The ONNX IR model of a captured program, unoptimised."""
    try:
        with silenced_output():
            onnx_program = _exported(
                program, inputs, opset, input_names=list(in_names), output_names=list(out_names)
            )
    except Exception as e:  # noqa: BLE001 -- an op the translator lacks: fall back, with its reason
        raise CaptureFailed(f"the ONNX translation of the {role} graph failed: {first_line(e)}") from e
    return onnx_program.model


def _optimised_proto(model: Any) -> onnx.ModelProto:
    """onnxscript's optimisation (constant folding, its default rewrites; see
    :mod:`graphtricks.onnx.optimise`) on the weightless graph."""
    import onnx_ir as ir

    optimise(model)
    return ir.serde.serialize_model(model)


def _name_constants_by_content(model: onnx.ModelProto, state: Mapping[str, torch.Tensor]) -> None:
    """Renames the exporter's own constants (``val_63``: folded masks, shapes) after their content.

    The exporter numbers them per graph, so one name holds different values in the train and the
    inference graph; named by content, equal constants share a name in both, and the weight
    comparison matches the graphs' real weights by name.
    """
    from graphtricks.onnx.portable import BN_TAG, DROPOUT_TAG
    from graphtricks.onnx.weights import tensor_value

    in_subgraphs = {
        name for node in model.graph.node for a in node.attribute
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs)
        for inner in g.node for name in inner.input
    }
    renamed: dict[str, str] = {}
    for init in model.graph.initializer:
        # a weight folded transposed (W.T) keeps its weight's name: it is the model's, not the exporter's
        if init.name in state or init.name.removesuffix(TRANSPOSED_SUFFIX) in state:
            continue
        if init.name.startswith((DROPOUT_TAG, BN_TAG)) or init.name in in_subgraphs:
            continue
        array = np.ascontiguousarray(tensor_value(init))
        digest = hashlib.blake2b(
            repr((init.data_type, tuple(init.dims))).encode() + array.tobytes(), digest_size=8
        ).hexdigest()
        renamed[init.name] = f"{CONSTANT_PREFIX}{digest}"
    taken: set[str] = set()
    kept = []
    for init in model.graph.initializer:
        new = renamed.get(init.name)
        if new is not None:
            if new in taken:
                continue  # the same value twice: one initializer
            init.name = new
        taken.add(init.name)
        kept.append(init)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    for value in model.graph.output:
        if value.name in renamed:  # an output that is a constant keeps its name through an Identity
            raise ExportError(f"graph output {value.name} is a constant; return a computed tensor")


def export_copy(model: nn.Module) -> nn.Module:
    """The copy every twin of ``model`` is made from: its parameters shared, its fx guards gone
    (they check eager calls, and would fix a dynamic dimension's size)."""
    try:
        copy = reference_copy(model, train=False, device="cpu")
    except ValidationError as e:
        raise ExportError(str(e)) from e
    strip_fx_guards(copy)
    return copy


def _name_dynamic_dims(model: onnx.ModelProto) -> None:
    """Names torch's symbols (``s21``) after the first input dimension they size: ``batch`` for a
    dimension 0, else ``<input>_<dim>``; outputs and inner values follow."""
    names: dict[str, str] = {}
    for value in model.graph.input:
        for d, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param and dim.dim_param not in names:
                label = "batch" if d == 0 else f"{value.name}_{d}"
                names[dim.dim_param] = label if label not in names.values() else f"{label}_{len(names)}"
    if not names:
        return
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]


@contextlib.contextmanager
def _recorded() -> Iterator[list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        yield recorded


def export_twin(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    *,
    role: str,
    opset: int,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic: Any = None,
    table: WeightTable,
    copy: nn.Module | None = None,
) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """Exports one twin of ``model``: ``role`` ``"train"``, ``"infer"`` (the eval forward) or
    ``"mc"`` (eval with every dropout on).

    Args:
        model: The model; not changed (a copy sharing its parameters is exported).
        inputs: The example inputs.
        opset: The ONNX opset (``DYNAMO_MIN_OPSET`` or more).
        input_names: The graph input names.
        output_names: The names of the model's outputs; a train twin's running statistics
            follow as ``updated.<buffer>``.
        dynamic: ``torch.export`` dynamic shapes (:func:`dynamic_shapes_for`), or None.
        table: Holds views of the large weights.
        copy: A copy of ``model`` from :func:`export_copy`, to use (in the role's mode) rather
            than make one: a deep copy of a model with fx regions regenerates their code.

    Returns:
        The graph, the warnings worth showing, and the ``updated.*`` output names.

    Raises:
        CaptureFailed: torch.export or the ONNX translation cannot handle the model.
        ExportError: The model cannot be copied, a dynamic dimension is specialised, or the
            graph reads tensors that are not the model's parameters or buffers.
    """
    from graphtricks.onnx.torchscript import describe_warning

    copy = copy or export_copy(model)
    copy.train(role == "train")  # not its result: an overriding train() may return None
    twin, mode = make_twin(copy, mc=role == "mc")
    with _recorded() as recorded:
        with torch.no_grad():
            try:  # registers the sites, so that the trace records each site's module
                twin(*inputs)
            except ExportError:
                raise
            except Exception as e:  # noqa: BLE001
                raise CaptureFailed(f"the {role} twin does not run: {first_line(e)}") from e
        program = _capture(twin, inputs, dynamic, role, input_names)
        extra = updated_names(mode)
        ir_model = _translate(program, inputs, opset, input_names, list(output_names) + extra, role)
        del program
        state = dict(model.named_parameters()) | dict(model.named_buffers())
        n_inputs = _weights_as_inputs(ir_model, state)
        proto = _optimised_proto(ir_model)
    shown = list(dict.fromkeys(describe_warning(w) for w in recorded if not _is_noise(w)))
    missing = attach_state(proto, n_inputs, {k: v for k, v in state.items() if v.device.type != "meta"}, table)
    if missing:
        raise ExportError(
            f"the {role} graph reads weights {missing[:3]} that are not parameters or buffers of "
            "the model; register them as buffers"
        )
    name_twin_sites(proto, set(state))  # the inference twin has sites too: eval-mode batch statistics
    _name_constants_by_content(proto, state)
    _name_dynamic_dims(proto)
    for node in proto.graph.node:  # stack traces and scopes, read: they would double the file
        del node.metadata_props[:]
    return proto, shown, extra
