"""Which nodes of a graph ONNX Runtime's CUDA provider has no kernel for, by op, opset and dtype.

The kernel list is ``data/cuda_kernels.txt``, transcribed from ONNX Runtime's
``docs/OperatorKernels.md`` (its header says from which commit). A session with CPU fallback
disabled fails on any node listed here; this check says so without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import onnx
from onnx import defs, helper, shape_inference

from graphtricks.onnx.graph import opset_of

__all__ = ["KERNELS_FILE", "CudaKernel", "cuda_gaps", "cuda_kernels"]

KERNELS_FILE = Path(__file__).with_name("data") / "cuda_kernels.txt"

_SETS = {
    "ALL": "bf16 bool f16 f32 f64 i8 i16 i32 i64 u8 u16 u32 u64",
    "NUM": "bf16 f16 f32 f64 i8 i16 i32 i64 u8 u16 u32 u64",
    "FLT": "f16 f32 f64",
}
_SHORT = {
    onnx.TensorProto.BFLOAT16: "bf16", onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.FLOAT16: "f16", onnx.TensorProto.FLOAT: "f32",
    onnx.TensorProto.DOUBLE: "f64", onnx.TensorProto.INT8: "i8", onnx.TensorProto.INT16: "i16",
    onnx.TensorProto.INT32: "i32", onnx.TensorProto.INT64: "i64", onnx.TensorProto.UINT8: "u8",
    onnx.TensorProto.UINT16: "u16", onnx.TensorProto.UINT32: "u32",
    onnx.TensorProto.UINT64: "u64", onnx.TensorProto.STRING: "str",
}
# Not kernels: ONNX Runtime turns these into initializers before it places nodes.
_NOT_KERNELS = frozenset({"Constant"})


@dataclass(frozen=True)
class CudaKernel:
    """One line of the kernel list: an op, the opset versions it covers and its dtypes."""

    op: str
    first: int
    last: int | None
    input_index: int
    inputs: frozenset[str] | None  # None: nothing checked
    outputs: frozenset[str] | None


def _types(field: str) -> tuple[int, frozenset[str] | None]:
    """``"in1=f16,f32"`` -> (1, {"f16", "f32"}); ``"-"`` -> (0, None)."""
    index = 0
    if field.startswith("in") and "=" in field:
        head, field = field.split("=", 1)
        index = int(head[2:])
    if field == "-":
        return index, None
    names = set()
    for part in field.split(","):
        names.update(_SETS.get(part, part).split())
    return index, frozenset(names)


@lru_cache(maxsize=1)
def cuda_kernels() -> dict[str, tuple[CudaKernel, ...]]:
    """The kernel list, by op name."""
    table: dict[str, list[CudaKernel]] = {}
    for line in KERNELS_FILE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        op, versions, ins, outs = line.split()
        if versions.endswith("+"):
            first, last = int(versions[:-1]), None
        else:
            low, high = versions.split("-")
            first, last = int(low), int(high)
        index, inputs = _types(ins)
        table.setdefault(op, []).append(
            CudaKernel(op, first, last, index, inputs, _types(outs)[1])
        )
    return {op: tuple(kernels) for op, kernels in table.items()}


def _elem_types(model: onnx.ModelProto) -> dict[str, str]:
    """The short element type name of every value shape inference can tell."""
    inferred = shape_inference.infer_shapes(model)
    out = {}
    graph = inferred.graph
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        elem = value.type.tensor_type.elem_type
        if elem in _SHORT:
            out[value.name] = _SHORT[elem]
    for init in graph.initializer:
        if init.data_type in _SHORT:
            out[init.name] = _SHORT[init.data_type]
    for node in graph.node:  # Constant outputs: shape inference may leave them out
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            elem = node.attribute[0].t.data_type
            if elem in _SHORT:
                out.setdefault(node.output[0], _SHORT[elem])
    return out


def cuda_gaps(model: onnx.ModelProto) -> list[str]:
    """The top-level nodes of ``model`` the CUDA provider has no kernel for.

    A node is covered when a kernel of its op covers the op's version at the model's opset
    and accepts the element type of its checked input and of its first output (when shape
    inference tells them).

    Returns:
        One line per node that is not covered: ``"<op> '<name>' (<why>)"``.
    """
    opset, kernels, types = opset_of(model), cuda_kernels(), _elem_types(model)
    gaps = []
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}#{i}"
        if node.op_type in _NOT_KERNELS:
            continue
        if node.domain not in ("", "ai.onnx"):
            gaps.append(f"{node.op_type} '{name}' (domain {node.domain} is not checked)")
            continue
        try:
            since = defs.get_schema(node.op_type, opset).since_version
        except defs.SchemaError:  # an op the installed onnx does not know
            gaps.append(f"{node.op_type} '{name}' (unknown op)")
            continue
        found = [k for k in kernels.get(node.op_type, ())
                 if k.first <= since and (k.last is None or since <= k.last)]
        if not found:
            gaps.append(f"{node.op_type} '{name}' (no CUDA kernel for version {since})")
            continue
        kernel = found[0]
        index = kernel.input_index
        seen_in = types.get(node.input[index]) if len(node.input) > index else None
        seen_out = types.get(node.output[0]) if node.output else None
        if kernel.inputs is not None and seen_in is not None and seen_in not in kernel.inputs:
            gaps.append(f"{node.op_type} '{name}' (no CUDA kernel for input type {seen_in})")
        elif kernel.outputs is not None and seen_out is not None and seen_out not in kernel.outputs:
            gaps.append(f"{node.op_type} '{name}' (no CUDA kernel for output type {seen_out})")
    return gaps


def _describe_elem(elem: int) -> str:
    """A tensor element type in the list's short form."""
    return _SHORT.get(elem, helper.tensor_dtype_to_string(elem))
