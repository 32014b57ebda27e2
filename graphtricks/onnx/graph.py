"""Reading and editing ONNX graphs: loading with clear errors, Dropout and BatchNorm surgery.

Random subgraphs (stochastic depth) and the train-only part of a graph are in
:mod:`graphtricks.onnx.train_only`.

Only the top-level graph is inspected and edited; Dropout or BatchNormalization inside
control-flow subgraphs (If/Loop bodies) is not seen by these helpers.
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphtricks.errors import ValidationError
from graphtricks.onnx.weights import (
    WeightTable,
    checkable,
    is_stub,
    load_mapped,
    resolve_external,
    tensor_value,
)

__all__ = [
    "RANDOM_OPS",
    "TRAIN_ONLY_OPS",
    "DropoutInfo",
    "constant_values",
    "dropout_infos",
    "exposed_dropout_copy",
    "folded_operator_counts",
    "initializer_arrays",
    "io_signature",
    "load_onnx_file",
    "neutralised_dropout_copy",
    "opset_of",
    "train_mode_batchnorms",
]

# ONNX operators that draw random numbers: in a train graph, stochastic depth's masks.
RANDOM_OPS = frozenset(
    {"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Bernoulli",
     "Multinomial"}
)
# Ops that only exist in the train graph. BatchNormalization is in both graphs (training_mode
# 1 vs 0), so it is told apart by its attribute, not listed here.
TRAIN_ONLY_OPS = frozenset({"Dropout"}) | RANDOM_OPS


@dataclass(frozen=True)
class DropoutInfo:
    """A Dropout node and what its constant inputs say.

    Attributes:
        name: The node name (or ``"Dropout#i"`` when unnamed).
        index: The node's position in ``graph.node``.
        data: The name of its data input.
        output: The name of its main output.
        ratio: The drop probability, ``None`` when not a constant.
        training: The ``training_mode`` input, ``False`` when absent, ``None`` when not a constant.
        mask: For a dropout of the portable train graph (``portable.portable_dropouts``), the
            value holding its scaled mask; ``None`` for an ONNX Dropout node.
        shift: For an alpha dropout of the portable train graph, the value added after the
            mask (``output = data * mask + shift``); ``None`` for any other dropout.
    """

    name: str
    index: int
    data: str
    output: str
    ratio: float | None
    training: bool | None
    mask: str | None = None
    shift: str | None = None


def load_onnx_file(path: Path, role: str, table: WeightTable | None = None) -> onnx.ModelProto:
    """Loads and checks an ONNX file, its external data (if any) mapped, not read.

    Args:
        path: The ``.onnx`` file.
        role: ``"train"`` or ``"inference"``, for the error message.
        table: Holds the memory maps of external data (shared by every graph loaded with it);
            without one, external data is read into the graph.

    Returns:
        The parsed model.

    Raises:
        ValidationError: The file or its data file is missing, truncated or not valid ONNX.
    """
    if not path.is_file():
        raise ValidationError(f"{role} ONNX file not found: {path}; run the export first")
    try:
        if table is None:
            model = onnx.load(str(path), load_external_data=False)
        else:  # large weights inside the file stay in it, mapped (load_mapped)
            model = load_mapped(path, table)
    except Exception as e:  # protobuf DecodeError: the file is unusable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValidationError(
            f"{role} ONNX file {path} is truncated or invalid ({first}); export it again"
        ) from e
    # The checker reads a self-contained file whole: it checks the structure, weights mapped.
    self_contained = table is not None and not any(
        i.data_location == onnx.TensorProto.EXTERNAL and not is_stub(i)
        for i in model.graph.initializer
    )
    with WeightTable() if table is None else contextlib.nullcontext(table) as held:
        resolve_external(model, path.parent, held, ValidationError, role)
        try:
            # from the file (no second serialization), or the structure alone
            onnx.checker.check_model(checkable(model) if self_contained else str(path))
        except Exception as e:  # checker errors: the file is unusable
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValidationError(
                f"{role} ONNX file {path} is truncated or invalid ({first}); export it again"
            ) from e
        if table is None:  # no table to hold the maps: the data goes into the graph
            for init in model.graph.initializer:
                if init.data_location == onnx.TensorProto.EXTERNAL:
                    init.CopyFrom(numpy_helper.from_array(np.array(tensor_value(init)), init.name))
    return model


class _Constants(Mapping):
    """Initializer and ``Constant`` values by name, each converted to numpy when first read.

    Most callers ask only which names are constant, or for a few small values (a Dropout's
    ratio): converting every weight up front cost a validation more than its checks.
    """

    def __init__(self, model: onnx.ModelProto, nodes: bool = True):
        self._protos = {init.name: init for init in model.graph.initializer}
        for node in model.graph.node if nodes else ():
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self._protos[node.output[0]] = node.attribute[0].t
        self._arrays: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = tensor_value(self._protos[name])
        return self._arrays[name]

    def __contains__(self, name: object) -> bool:
        return name in self._protos

    def __iter__(self):
        return iter(self._protos)

    def __len__(self) -> int:
        return len(self._protos)


def constant_values(model: onnx.ModelProto) -> Mapping[str, np.ndarray]:
    """Maps the names of initializers and ``Constant`` node outputs to their values (read lazily)."""
    return _Constants(model)


def _optional_input(node: onnx.NodeProto, i: int) -> str | None:
    """The i-th input name, or None when absent (ONNX marks skipped inputs with "")."""
    return node.input[i] if len(node.input) > i and node.input[i] else None


def dropout_infos(model: onnx.ModelProto) -> list[DropoutInfo]:
    """Describes every top-level Dropout node of ``model``."""
    consts = constant_values(model)
    infos = []
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Dropout":
            continue
        ratio_name, mode_name = _optional_input(node, 1), _optional_input(node, 2)
        ratio = 0.5 if ratio_name is None else consts.get(ratio_name)
        training = False if mode_name is None else consts.get(mode_name)
        infos.append(
            DropoutInfo(
                name=node.name or f"Dropout#{i}",
                index=i,
                data=node.input[0],
                output=node.output[0],
                ratio=None if ratio is None else float(np.asarray(ratio)),
                training=None if training is None else bool(np.asarray(training)),
            )
        )
    return infos


def train_mode_batchnorms(model: onnx.ModelProto) -> list[str]:
    """Names of BatchNormalization nodes with ``training_mode=1`` (batch statistics)."""
    names = []
    for i, node in enumerate(model.graph.node):
        if node.op_type == "BatchNormalization":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("training_mode", 0) == 1:
                names.append(node.name or f"BatchNormalization#{i}")
    return names


def _add_scalar(model: onnx.ModelProto, name: str, value: np.ndarray) -> str:
    """Adds a scalar initializer under a name no value in the graph uses yet."""
    taken = {i.name for i in model.graph.initializer}
    taken.update(o for n in model.graph.node for o in n.output)
    unique, k = name, 0
    while unique in taken:
        k += 1
        unique = f"{name}_{k}"
    model.graph.initializer.append(numpy_helper.from_array(value, unique))
    return unique


def neutralised_dropout_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose every Dropout has ratio 0, so the graph is deterministic.

    The Dropout nodes stay (still in training mode): only their drop probability changes, the
    ONNX-side twin of setting ``p=0`` on the PyTorch side.
    """
    out = copy.deepcopy(model)
    consts = constant_values(out)
    zeros: dict[str, str] = {}
    for node in out.graph.node:
        if node.op_type != "Dropout":
            continue
        old = _optional_input(node, 1)
        # The ratio keeps its own dtype (T1 may differ from the data type).
        dtype = consts[old].dtype if old is not None and old in consts else np.dtype(np.float32)
        if dtype.str not in zeros:
            zeros[dtype.str] = _add_scalar(out, "graphtricks_zero_ratio", np.zeros((), dtype))
        while len(node.input) < 2:
            node.input.append("")
        node.input[1] = zeros[dtype.str]
    return out


def exposed_dropout_copy(
    model: onnx.ModelProto, seed: int, portable: Sequence[DropoutInfo] = ()
) -> onnx.ModelProto:
    """A copy of ``model`` with each dropout's data input and output added as graph outputs.

    The Dropout nodes get seeds derived from ``seed`` so that one session gives the same masks
    run after run. Each node gets its own: with one shared seed, same-shaped Dropouts draw the
    same mask, and a Dropout fed by an earlier one then only "drops" elements already zero,
    which reads as an inert Dropout. The added outputs carry no type: ONNX Runtime infers it.

    Args:
        model: The train graph.
        seed: Seeds every draw.
        portable: The dropouts of a portable train graph (``portable.portable_dropouts``):
            their draw is seeded the same way and their mask is exposed too.
    """
    out = copy.deepcopy(model)
    present = {o.name for o in out.graph.output}

    def expose(name: str) -> None:
        if name and name not in present:
            out.graph.output.append(helper.make_empty_tensor_value_info(name))
            present.add(name)

    draws = {info.index: info for info in portable}
    index = 0
    for i, node in enumerate(out.graph.node):
        if node.op_type != "Dropout" and i not in draws:
            continue
        index += 1
        kept = [a for a in node.attribute if a.name != "seed"]
        value = int(seed) * 7919 + index
        del node.attribute[:]
        node.attribute.extend(
            kept + [helper.make_attribute("seed", value if i not in draws else float(value))]
        )
        info = draws.get(i)
        names = (node.input[0], node.output[0]) if info is None else (
            info.data, info.mask or "", info.output, info.shift or ""
        )
        for name in names:
            expose(name)
    return out


def initializer_arrays(model: onnx.ModelProto) -> Mapping[str, np.ndarray]:
    """Maps initializer names to their values (read lazily)."""
    return _Constants(model, nodes=False)


def _value_signature(value: onnx.ValueInfoProto) -> tuple[str, int, int | None]:
    """(name, ONNX element type, rank or None when unknown) of a graph input or output."""
    tensor = value.type.tensor_type
    rank = len(tensor.shape.dim) if tensor.HasField("shape") else None
    return value.name, tensor.elem_type, rank


def io_signature(model: onnx.ModelProto) -> tuple[list[tuple], list[tuple]]:
    """The (name, element type, rank) of each real graph input and of each graph output."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [_value_signature(v) for v in model.graph.input if v.name not in inits]
    return inputs, [_value_signature(v) for v in model.graph.output]


def opset_of(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ValidationError("ONNX model imports no default-domain opset; export it again")


@dataclass
class _Op:
    """What operator counting needs of a node: its kind, wiring and Transpose permutation."""

    kind: tuple[str, str]
    inputs: list[str]
    output: str
    perm: tuple[int, ...] | None
    live: bool = True


def folded_operator_counts(
    nodes: Iterable[onnx.NodeProto], rename: Mapping[str, str], graph_outputs: Iterable[str]
) -> Counter:
    """Counts ``(domain, op_type)`` of ``nodes`` once Transposes are folded as the exporter folds them.

    The TorchScript exporter's peephole pass merges consecutive Transposes (dropping those that
    cancel out) and folds a 2-D Transpose into the Gemm reading it. It does so in the inference
    graph where an eval-mode Dropout, gone there, separated them in the train graph. Folding
    both graphs alike makes their counts comparable; a graph that is already folded counts the same.

    Args:
        nodes: The nodes to count, in graph order.
        rename: Values to read in place of others (a removed node's output -> its input).
        graph_outputs: The graph's outputs, which keep the Transposes producing them.

    Returns:
        The operator counts.
    """
    rename, ops, producer = dict(rename), [], {}

    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        perm = tuple(attrs["perm"]) if node.op_type == "Transpose" and "perm" in attrs else None
        op = _Op((node.domain or "ai.onnx", node.op_type), [resolve(i) for i in node.input],
                 node.output[0] if node.output else "", perm)
        source = producer.get(op.inputs[0]) if op.inputs else None
        if op.perm is not None and source is not None and source.perm is not None:
            op.perm, op.inputs[0] = tuple(source.perm[j] for j in op.perm), source.inputs[0]
        if op.perm is not None and op.perm == tuple(range(len(op.perm))):  # cancels out
            rename[op.output], op.live = op.inputs[0], False
        if op.kind == ("ai.onnx", "Gemm"):
            for k, name in enumerate(op.inputs[:2]):
                folded = producer.get(name)
                if folded is not None and folded.perm == (1, 0):
                    op.inputs[k] = folded.inputs[0]
        ops.append(op)
        producer.update((o, op) for o in node.output if o)
    read = {resolve(o) for o in graph_outputs}
    for op in reversed(ops):  # a Transpose nothing reads any more was folded into its readers
        if op.perm is not None and op.live and op.output not in read:
            op.live = False
        if op.live:
            read.update(op.inputs)
    return Counter(op.kind for op in ops if op.live)
