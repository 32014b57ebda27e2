"""Weights kept out of the ONNX protos: in memory while graphs are built and checked, on disk as
ONNX external data, or streamed into a self-contained file.

A ``ModelProto`` holding its weights costs their size again at every copy, serialization and
parse, which made export take ~9x and validation ~15x a model's parameter bytes. Here a large
initializer stays a *stub*: an external-data entry whose location names an array held by a
:class:`WeightTable` (``graphtricks_in_memory/...``), never a file. Export fills the table with
views of the model's own tensors (no copy); validation with read-only memory maps of the data
file, which both graphs share. ONNX Runtime gets the arrays as OrtValues
(:func:`graphtricks.onnx.runtime.prepare_graph`) and uses them in place on CPU.

Files are written one of two ways (:func:`write_graphs`):

- *external data*: each graph file holds its structure, and one data file (:data:`DATA_FILE`)
  holds every weight once, shared by both graphs, each tensor aligned to 4 KiB so ONNX Runtime
  can map it. Chosen on request, and whenever a graph would pass protobuf's 2 GiB limit;
- *self-contained*: the structure, then each weight appended as a further piece of the graph
  message (protobuf merges repeated pieces of a message field), straight from the array.
"""

from __future__ import annotations

import mmap
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

__all__ = [
    "DATA_FILE",
    "EXTERNAL_DATA_THRESHOLD",
    "TRANSPOSED_SUFFIX",
    "WeightTable",
    "attach_state",
    "checkable",
    "file_source",
    "graph_bytes",
    "in_memory_array",
    "is_stub",
    "load_mapped",
    "release_graph",
    "release_pages",
    "resolve_external",
    "tensor_value",
    "write_graphs",
]

DATA_FILE = "model.data"
# protobuf refuses to serialize or parse a message of 2 GiB or more.
EXTERNAL_DATA_THRESHOLD = 2**31 - 1
_PREFIX = "graphtricks_in_memory/"
_ALIGN = 4096  # ONNX Runtime maps external data whose offset is a multiple of the page size
# Smaller tensors (scalars, shapes) stay inside the graph, where they cost nothing.
_STUB_BYTES = 1024
# Element types ONNX Runtime takes from numpy without conversion; int64 values (shapes, axes,
# position ids) stay in the graph: ONNX Runtime reads them while it loads it.
_STUB_TYPES = frozenset(
    np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32,
                          np.uint8, np.uint16, np.uint32, np.uint64, np.bool_)
)

_REGISTRY: dict[str, np.ndarray] = {}
# A weight folded transposed (MatMul reads W.T) is an initializer named W.T
TRANSPOSED_SUFFIX = ".T"
# address of a file map -> (its size, the mmap): what release_pages looks arrays up in
_MAPS: dict[int, tuple[int, mmap.mmap]] = {}
# key -> (data file, offset, length) for arrays that are memory maps of a file's bytes
_SOURCES: dict[str, tuple[Path, int, int]] = {}


class WeightTable:
    """Arrays that stand in for initializer data while a block runs (``with WeightTable():``).

    Stubs made by a table resolve (:func:`tensor_value`, ONNX Runtime sessions) until it closes.
    """

    def __init__(self) -> None:
        self._id = uuid.uuid4().hex[:12]
        self._keys: list[str] = []
        self._maps: dict[Path, np.ndarray] = {}

    def __enter__(self) -> WeightTable:  # noqa: PYI034 -- not subclassed; typing.Self needs 3.11
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Forgets every array (memory maps close when the last view goes)."""
        for key in self._keys:
            _REGISTRY.pop(key, None)
            _SOURCES.pop(key, None)
        for array in self._maps.values():
            _MAPS.pop(array.__array_interface__["data"][0], None)
        self._keys.clear()
        self._maps.clear()

    def stub(
        self, name: str, array: np.ndarray, data_type: int | None = None,
        source: tuple[Path, int, int] | None = None,
    ) -> onnx.TensorProto:
        """An initializer named ``name`` whose data is ``array`` (held, not copied).

        ``source`` (data file, offset, length): where ``array``'s bytes lie on disk, when it is a
        memory map of them; ONNX Runtime sessions then take it in place (see
        :func:`graphtricks.onnx.runtime.prepare_graph`).
        """
        key = f"{_PREFIX}{self._id}/{len(self._keys)}"
        _REGISTRY[key] = array
        if source is not None:
            _SOURCES[key] = source
        self._keys.append(key)
        if data_type is None:
            data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor = onnx.TensorProto(
            name=name, data_type=data_type, dims=array.shape,
            data_location=onnx.TensorProto.EXTERNAL,
        )
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", key
        return tensor

    def mapped(self, path: Path) -> np.ndarray:
        """A read-only byte map of ``path``, one per file however many graphs read it."""
        path = path.resolve()
        if path not in self._maps:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    self._maps[path] = np.zeros(0, np.uint8)
                else:
                    view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                    self._maps[path] = np.frombuffer(view, np.uint8)
                    _MAPS[self._maps[path].__array_interface__["data"][0]] = (size, view)
        return self._maps[path]


def release_pages(array: np.ndarray | None) -> None:
    """Drops the resident pages of an array that maps a file (no-op for any other array).

    Resident pages of a map count in the process's memory until it is closed; read again, they
    come back from the page cache. Validation releases a graph's weights once it is done with
    them, so that a self-contained pair's two files are never resident at once.
    """
    if array is None or not array.nbytes or not hasattr(mmap, "MADV_DONTNEED"):
        return  # (no madvise on Windows: the pages stay until the table closes)
    address = array.__array_interface__["data"][0]
    for base, (size, view) in _MAPS.items():
        if base <= address < base + size:
            start = (address - base) // mmap.PAGESIZE * mmap.PAGESIZE
            view.madvise(mmap.MADV_DONTNEED, start, min(size, address - base + array.nbytes) - start)
            return


def release_graph(model: onnx.ModelProto) -> None:
    """:func:`release_pages` of every weight of ``model`` held as a stub."""
    for init in model.graph.initializer:
        release_pages(in_memory_array(init))


def _entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def is_stub(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor``'s data is an array of a :class:`WeightTable`."""
    return (
        tensor.data_location == onnx.TensorProto.EXTERNAL
        and _entries(tensor).get("location", "").startswith(_PREFIX)
    )


def in_memory_array(tensor: onnx.TensorProto) -> np.ndarray | None:
    """The array a stub stands for, else None."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return _REGISTRY.get(_entries(tensor).get("location", ""))


def file_source(tensor: onnx.TensorProto) -> tuple[Path, int, int] | None:
    """(data file, offset, length) of a stub whose array maps a data file, else None."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return _SOURCES.get(_entries(tensor).get("location", ""))


def tensor_value(tensor: onnx.TensorProto) -> np.ndarray:
    """An initializer's value, from the graph or from its stub's array."""
    array = in_memory_array(tensor)
    if array is not None:
        return array
    return numpy_helper.to_array(tensor)


def graph_bytes(model: onnx.ModelProto) -> int:
    """The serialized size of ``model`` with its stubs' data included (an upper bound)."""
    total = model.ByteSize()
    for init in model.graph.initializer:
        array = in_memory_array(init)
        if array is not None:
            total += array.nbytes + 16
    return total


def _array_of(tensor: torch.Tensor) -> tuple[np.ndarray, int]:
    """A numpy view of ``tensor``'s data (bfloat16 as its raw 16 bits), and its ONNX type."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), onnx.TensorProto.BFLOAT16
    array = t.numpy()
    return array, helper.np_dtype_to_tensor_dtype(array.dtype)


def attach_state(
    model: onnx.ModelProto, n_inputs: int, state: Mapping[str, torch.Tensor], table: WeightTable
) -> list[str]:
    """Turns the weight inputs of a graph exported without parameters into initializers.

    The exporter, asked not to write parameters, lists them as graph inputs after the real ones,
    named like the model's state. Each becomes an initializer with the model's own value: a stub
    on a view of the tensor when large, an ordinary initializer when small.

    Args:
        model: The graph; edited in place.
        n_inputs: How many of its inputs are real inputs.
        state: The model's parameters and buffers by qualified name.
        table: Holds the views.

    Returns:
        The names of the inputs no tensor of ``state`` matched (left as inputs).
    """
    graph = model.graph
    kept, missing = list(graph.input[:n_inputs]), []
    for value in graph.input[n_inputs:]:
        tensor = state.get(value.name)
        if tensor is None:
            kept.append(value)
            missing.append(value.name)
            continue
        array, data_type = _array_of(tensor)
        if array.nbytes >= _STUB_BYTES and array.dtype in _STUB_TYPES and data_type != onnx.TensorProto.BFLOAT16:
            graph.initializer.append(table.stub(value.name, array, data_type))
        elif data_type == onnx.TensorProto.BFLOAT16:
            init = onnx.TensorProto(name=value.name, data_type=data_type, dims=array.shape)
            init.raw_data = array.tobytes()
            graph.initializer.append(init)
        else:
            graph.initializer.append(numpy_helper.from_array(array.reshape(array.shape), value.name))  # 0-d stays 0-d
    del graph.input[:]
    graph.input.extend(kept)
    _fold_weight_transposes(graph, table)
    return missing


def _uses(graph: onnx.GraphProto, counts: dict[str, int]) -> None:
    """Counts every name read by a node of ``graph`` or of its subgraphs, and its outputs."""
    for node in graph.node:
        for name in node.input:
            counts[name] = counts.get(name, 0) + 1
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _uses(sub, counts)
    for out in graph.output:
        counts[out.name] = counts.get(out.name, 0) + 1


def _fold_weight_transposes(graph: onnx.GraphProto, table: WeightTable) -> None:
    """``MatMul(x, Transpose(W))`` with a 2-D weight W read nowhere else becomes ``MatMul(x, W.T)``:
    an initializer ``W.T`` that is a transposed view of W (written transposed, one at a time).

    The exporter, given weights as inputs, cannot fold ``x @ W.T`` (``nn.Linear`` on more than
    2 dimensions); ONNX Runtime's constant folding then made a transposed copy of every such
    weight in every session (a BERT encoder: 0.9x its parameter bytes per session), and users'
    sessions paid the same. Folded here, the data file holds the matrix in the order MatMul reads
    it, and sessions use it in place.
    """
    inits = {init.name: init for init in graph.initializer}
    counts: dict[str, int] = {}
    _uses(graph, counts)
    taken = set(inits) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    renamed: dict[str, str] = {}
    dropped: set[int] = set()
    for index, node in enumerate(graph.node):
        if node.op_type != "Transpose" or len(node.input) != 1 or len(node.output) != 1:
            continue
        weight = inits.get(node.input[0])
        array = in_memory_array(weight) if weight is not None else None
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        if (
            array is None or array.ndim != 2 or counts.get(weight.name) != 1
            or perm not in ([], [[1, 0]]) or node.output[0] in renamed
        ):
            continue
        name = f"{weight.name}{TRANSPOSED_SUFFIX}"
        if name in taken:
            continue
        taken.add(name)
        stub = table.stub(name, array.T, weight.data_type)
        weight.CopyFrom(stub)
        renamed[node.output[0]] = name
        dropped.add(index)
    if not renamed:
        return
    kept = [n for i, n in enumerate(graph.node) if i not in dropped]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    _rename_in_subgraphs(kept, renamed)
    for out in graph.output:
        if out.name in renamed:
            out.name = renamed[out.name]
    value_info = [v for v in graph.value_info if v.name not in renamed]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.value_info[:]
    graph.value_info.extend(value_info)


def _rename_in_subgraphs(nodes, renamed: dict[str, str]) -> None:
    for node in nodes:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                for inner in sub.node:
                    for i, name in enumerate(inner.input):
                        if name in renamed:
                            inner.input[i] = renamed[name]
                _rename_in_subgraphs(sub.node, renamed)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, length: int) -> bytes:
    """The key and length of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9
_RAW_ALIGN = 64  # where self-contained files put each large weight's bytes


def _varint_at(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _wire_fields(buf, start: int, end: int):
    """(field number, wire type, field start, value start, value end) of each field in a message."""
    pos = start
    while pos < end:
        key, value_start = _varint_at(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, value_end = _varint_at(buf, value_start)
        elif wire == 1:
            value_end = value_start + 8
        elif wire == 5:
            value_end = value_start + 4
        elif wire == 2:
            length, value_start = _varint_at(buf, value_start)
            value_end = value_start + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if value_end > end:
            raise ValueError("truncated protobuf message")
        yield number, wire, pos, value_start, value_end
        pos = value_end


def checkable(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` for ``onnx.checker``: each stub a graph input of its type and shape
    (the checker would look for a file named by the stub)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    stubs = [i for i in out.graph.initializer if is_stub(i)]
    kept = [i for i in out.graph.initializer if not is_stub(i)]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    for stub in stubs:
        out.graph.input.append(helper.make_tensor_value_info(stub.name, stub.data_type, stub.dims))
    return out


def load_mapped(path: Path, table: WeightTable) -> onnx.ModelProto:
    """Parses a self-contained ``.onnx`` file without reading its large weights: each becomes a stub
    on a read-only memory map of the file (copied once if its bytes are not aligned).

    Raises:
        ValueError: The file is not a well-formed protobuf message.
    """
    path = Path(path).resolve()
    mapped = table.mapped(path)
    buf = memoryview(mapped)
    model = onnx.ModelProto()
    rest = bytearray()
    for number, wire, field_start, start, end in _wire_fields(buf, 0, len(buf)):
        if number != _MODEL_GRAPH or wire != 2:
            rest += buf[field_start:end]
            continue
        graph = bytearray()
        stubs = []
        for g_number, g_wire, g_field, g_start, g_end in _wire_fields(buf, start, end):
            raw = None
            if g_number == _GRAPH_INITIALIZER and g_wire == 2:
                head = bytearray()
                for t_number, t_wire, t_field, t_start, t_end in _wire_fields(buf, g_start, g_end):
                    if t_number == _TENSOR_RAW_DATA and t_wire == 2 and t_end - t_start >= _STUB_BYTES:
                        raw = (t_start, t_end)
                    else:
                        head += buf[t_field:t_end]
                if raw is not None:
                    tensor = onnx.TensorProto.FromString(bytes(head))
                    try:
                        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
                    except (KeyError, TypeError, ValueError):
                        dtype = None
                    count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
                    length = raw[1] - raw[0]
                    if (
                        dtype in _STUB_TYPES and length == count * dtype.itemsize
                        and not tensor.HasField("data_location") and not tensor.external_data
                    ):
                        array = mapped[raw[0]:raw[1]]
                        if raw[0] % dtype.itemsize or raw[0] % _RAW_ALIGN:
                            array = array.copy()  # an older file: unaligned, read once
                        array = array.view(dtype).reshape(tuple(tensor.dims))
                        stubs.append(table.stub(
                            tensor.name, array, tensor.data_type, source=(path, raw[0], length)
                        ))
                        continue
            graph += buf[g_field:g_end]
        piece = onnx.GraphProto.FromString(bytes(graph))
        piece.initializer.extend(stubs)
        model.graph.MergeFrom(piece)
    head = onnx.ModelProto.FromString(bytes(rest))
    graph = model.graph
    head.graph.CopyFrom(graph) if graph.ByteSize() else None
    return head


def _bytes_of(array: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(array)).cast("B")


def _array_key(array: np.ndarray) -> tuple:
    """What tells one array's bytes from another's without reading them."""
    interface = array.__array_interface__
    # strides too: a square weight and its transposed view share data, bytes and shape
    return interface["data"][0], array.nbytes, array.dtype.str, array.shape, array.strides


def _copy_from(f: BinaryIO, source: tuple[str, int], length: int) -> bool:
    """Appends ``length`` bytes of an earlier written file at ``f``'s position, in the kernel;
    False (nothing appended) where the file system cannot."""
    f.flush()
    start = f.tell()
    try:
        with open(source[0], "rb") as src:
            offset, left = source[1], length
            while left:
                done = os.copy_file_range(src.fileno(), f.fileno(), left, offset)
                if not done:
                    raise OSError("copy_file_range copied nothing")
                offset, left = offset + done, left - done
    except (AttributeError, OSError):  # no copy_file_range, or not between these files
        f.seek(start)
        f.truncate()
        return False
    f.seek(start + length)
    return True


def _write_self_contained(
    f: BinaryIO, model: onnx.ModelProto, written: dict[tuple, tuple[str, int]]
) -> None:
    """Writes ``model`` with every stub's data inline, one tensor in memory at a time.

    ``written`` maps each array already written (:func:`_array_key`) to (file, offset); such an
    array's bytes are copied from there (the pair's second file would otherwise transpose and
    write every weight again), and the ones written here are added.
    """
    light, stubs = onnx.ModelProto(), []
    light.CopyFrom(model)
    inits = list(light.graph.initializer)
    del light.graph.initializer[:]
    for init in inits:
        if in_memory_array(init) is None:
            light.graph.initializer.append(init)
        else:
            stubs.append(init)
    structure = light.SerializeToString()
    f.write(structure)
    position = len(structure)
    for stub in stubs:
        array = in_memory_array(stub)
        length = array.nbytes
        # A doc_string of spaces puts the raw data at a multiple of _RAW_ALIGN in the file, so
        # validation maps it in place (load_mapped) instead of copying it.
        # k spaces lengthen the prefix by 2 + k bytes (k >= 1): pads 0..64 reach every residue
        for pad in range(_RAW_ALIGN + 1):
            head = onnx.TensorProto(name=stub.name, data_type=stub.data_type, dims=stub.dims)
            if pad:
                head.doc_string = " " * pad
            head_bytes = head.SerializeToString() + _field(_TENSOR_RAW_DATA, length)
            tensor_len = len(head_bytes) + length
            in_graph = _field(_GRAPH_INITIALIZER, tensor_len)
            prefix = _field(_MODEL_GRAPH, len(in_graph) + tensor_len) + in_graph + head_bytes
            if (position + len(prefix)) % _RAW_ALIGN == 0:
                break
        f.write(prefix)
        position += len(prefix)
        key = _array_key(array)
        if key not in written or not _copy_from(f, written[key], length):
            f.write(_bytes_of(array))
            written[key] = (f.name, position)
        position += length


def _write_external(
    f: BinaryIO, model: onnx.ModelProto, data: BinaryIO, offsets: dict[tuple, int], data_name: str
) -> None:
    """Writes ``model``'s structure, appending each stub's data to ``data`` once."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        array = in_memory_array(init)
        if array is None:
            continue
        key = _array_key(array)
        if key not in offsets:
            position = data.tell()
            pad = -position % _ALIGN
            data.write(b"\0" * pad)
            offsets[key] = position + pad
            data.write(_bytes_of(array))
        del init.external_data[:]
        for k, v in (("location", data_name), ("offset", str(offsets[key])),
                     ("length", str(array.nbytes))):
            entry = init.external_data.add()
            entry.key, entry.value = k, v
    f.write(out.SerializeToString())


def write_graphs(
    paths: Mapping[str, str], graphs: Mapping[str, onnx.ModelProto], data_path: str | None
) -> None:
    """Writes each graph to ``paths[name]``; with ``data_path``, their weights to it, shared.

    The files are not flushed to disk (``fsync``): the caller does it before renaming them.

    Args:
        paths: Where each graph goes (temporary files the caller renames into place).
        graphs: The graphs, stubs included.
        data_path: The external data file, or None for self-contained graphs. The graphs refer
            to it by :data:`DATA_FILE`, relative to their folder.
    """
    if data_path is None:
        written: dict[tuple, tuple[str, int]] = {}
        for name, model in graphs.items():
            with open(paths[name], "wb") as f:
                _write_self_contained(f, model, written)
        return
    offsets: dict[tuple, int] = {}
    with open(data_path, "wb") as data:
        for name, model in graphs.items():
            with open(paths[name], "wb") as f:
                _write_external(f, model, data, offsets, DATA_FILE)


def resolve_external(
    model: onnx.ModelProto, folder: Path, table: WeightTable, error: type[Exception], role: str
) -> None:
    """Replaces ``model``'s external-data entries by stubs on memory maps of the data files.

    Raises:
        error: A data file is missing, outside ``folder``, or shorter than the graph says.
    """
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL or is_stub(init):
            continue
        entries = _entries(init)
        location = entries.get("location", "")
        path = (folder / location).resolve()
        if not location or Path(location).is_absolute() or folder.resolve() not in path.parents:
            raise error(
                f"{role} graph: weight '{init.name}' points outside its folder ({location!r}); "
                "export it again"
            )
        if not path.is_file():
            raise error(
                f"{role} graph: weight data file {path} not found; copy it beside the .onnx "
                "file or export again"
            )
        mapped = table.mapped(path)
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
        except (KeyError, TypeError, ValueError):
            dtype = np.dtype(np.uint8)
        count = int(np.prod(init.dims)) if len(init.dims) else 1
        offset = int(entries.get("offset", 0))
        length = int(entries.get("length", count * dtype.itemsize))
        if offset + length > mapped.size or length != count * dtype.itemsize:
            raise error(
                f"{role} graph: weight data file {path.name} is truncated or does not match the "
                f"graph (weight '{init.name}' needs bytes {offset}..{offset + length}, the file "
                f"has {mapped.size}); export it again"
            )
        raw = mapped[offset:offset + length]
        if dtype in _STUB_TYPES:
            array = raw.view(dtype).reshape(tuple(init.dims))
            stub = table.stub(init.name, array, init.data_type, source=(path, offset, length))
        else:  # int64, bfloat16, strings: read into the graph
            stub = onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims)
            stub.raw_data = raw.tobytes()
        init.CopyFrom(stub)

