"""What only the train graph computes: Dropout, random subgraphs, and what parameterises them.

Stochastic depth (timm ``DropPath``, torchvision ``StochasticDepth``) exports, in train mode, as
a *random subgraph*: a random operator and the nodes computing only from it and constants,
``RandomUniformLike -> Less(u, keep_prob) -> Cast -> Div(keep_prob)``, whose result (the mask)
meets the data in a *consumer* node (``Mul(x, mask)``). The inference graph has none of it.
Channel dropout exports the same way around a *mask Dropout*, a Dropout of a tensor of ones
(``x * Dropout(ones(N, C, 1, ..., 1))``, see :func:`mask_dropouts`).

A mask computes from its draw and from constants that are no data (scalars, shapes): where it
meets data, even data no input reaches (a dropout in Swin V2's relative-position MLP, whose table
and weights are fixed), that node applies it, and what follows is the model's again.

This module finds those nodes, so the graph comparison can set them aside, and makes the
deterministic copy of a train graph that check 2a compares with PyTorch: every Dropout ratio 0,
every random operator replaced by a fixed value (a uniform's lower bound, a normal's mean),
as :mod:`graphtricks.onnx.draws` does on the PyTorch side. Only the random operator is replaced;
the nodes after it run as exported, so their constants (the ``1 / keep_prob`` scale) are
compared with PyTorch too.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from graphtricks.errors import ValidationError
from graphtricks.onnx.graph import (
    RANDOM_OPS,
    TRAIN_ONLY_OPS,
    constant_values,
    folded_operator_counts,
    neutralised_dropout_copy,
)
from graphtricks.onnx.names import TRAIN_ONLY_PREFIX
from graphtricks.onnx.portable import (
    DROPOUT_TAG,
    main_outputs,
    neutralised_portable_copy,
    portable_batchnorm_groups,
)

__all__ = [
    "RandomSubgraph",
    "data_values",
    "deterministic_train_copy",
    "dropout_subgraphs",
    "fixed_values",
    "mask_dropouts",
    "operator_multiset",
    "random_subgraphs",
    "train_only_feeds",
    "train_only_nodes",
    "train_only_output_nodes",
]


@dataclass(frozen=True)
class RandomSubgraph:
    """A random operator (or a mask Dropout), the nodes computing only from it and constants,
    and where it ends.

    Attributes:
        name: The random node's name (or ``"<op>#i"`` when unnamed).
        op: Its operator (``RandomUniformLike``, ``Bernoulli``, ...).
        index: Its position in ``graph.node``.
        nodes: Positions of the random node and of the nodes computing from it, in graph order.
        masks: The subgraph's values read outside it (by consumers or as graph outputs).
        consumers: Positions of the nodes that read a mask along with other data.
    """

    name: str
    op: str
    index: int
    nodes: tuple[int, ...]
    masks: tuple[str, ...]
    consumers: tuple[int, ...]


def fixed_values(model: onnx.ModelProto) -> set[str]:
    """Values fixed before any input arrives: initializers, Constants and what they compute
    (a Dropout or a random operator draws: its output is not fixed)."""
    fixed = set(constant_values(model)) | {i.name for i in model.graph.initializer}
    for node in model.graph.node:  # graph order is topological
        if node.op_type not in TRAIN_ONLY_OPS and all(not i or i in fixed for i in node.input):
            fixed.update(o for o in node.output if o)
    return fixed


# Operators whose output depends on their input's shape (and dtype) only, never on its values.
_SHAPE_READERS = frozenset({"Shape", "Size", "RandomUniformLike", "RandomNormalLike", "EyeLike"})


def _is_weight(tensor: onnx.TensorProto) -> bool:
    """Whether a constant tensor holds data of the model: floating-point, more than one element.

    A mask's own constants are scalars (a keep probability, a scale) and integer shapes; a
    weight table, a positional embedding or a relative-position table is none of those.
    """
    floating = helper.tensor_dtype_to_np_dtype(tensor.data_type).kind in "fc"
    return floating and int(np.prod(tensor.dims, dtype=np.int64)) > 1


def data_values(model: onnx.ModelProto) -> set[str]:
    """Values computed from the model's data: a graph input or a weight (:func:`_is_weight`).

    A value computed from a shape only (``Shape``, ``Size``, what a random ``*Like`` draws) is
    not data, whatever it was the shape of. A random subgraph computes from its draw and from
    fixed values that are not data: a node combining its mask with data applies the mask, even
    when the data is fixed too (a dropout on an input-independent path, such as Swin V2's
    relative-position MLP).
    """
    inits = {i.name: i for i in model.graph.initializer}
    data = {v.name for v in model.graph.input if v.name not in inits}  # an old IR lists weights as inputs too
    data |= {name for name, init in inits.items() if _is_weight(init)}
    for node in model.graph.node:  # graph order is topological
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None and _is_weight(value):
                data.update(o for o in node.output if o)
        elif node.op_type not in _SHAPE_READERS and any(i in data for i in node.input if i):
            data.update(o for o in node.output if o)
    return data


def _readers(nodes: Sequence[onnx.NodeProto]) -> dict[str, list[int]]:
    """The nodes reading each value, by index."""
    readers: dict[str, list[int]] = {}
    for j, node in enumerate(nodes):
        for i in dict.fromkeys(node.input):
            if i:
                readers.setdefault(i, []).append(j)
    return readers


def _spread(
    nodes: Sequence[onnx.NodeProto],
    start: int,
    fixed: set[str],
    graph_outputs: set[str],
    readers: dict[str, list[int]],
) -> tuple[list[int], list[int], tuple[str, ...]]:
    """From node ``start``: the nodes computing only from it and constants, the nodes reading
    its values along with other data (consumers), and the values read outside (masks).

    ``fixed`` holds the values a mask may compute from besides its draw: constants that are
    no data (:func:`data_values`). Only the readers of what it taints are visited, in graph
    order (which is topological), not every later node: a BERT has 147 dropouts and 3000 nodes.
    """
    tainted, members, consumers = {o for o in nodes[start].output if o}, [start], []
    queue = sorted({j for v in tainted for j in readers.get(v, ()) if j > start})
    queued = set(queue)
    while queue:
        j = heapq.heappop(queue)
        inputs = [i for i in nodes[j].input if i]
        if all(i in tainted or i in fixed for i in inputs):
            members.append(j)
            for o in (o for o in nodes[j].output if o):
                tainted.add(o)
                for k in readers.get(o, ()):
                    if k > j and k not in queued:
                        queued.add(k)
                        heapq.heappush(queue, k)
        else:
            consumers.append(j)
    read_outside = {i for j in consumers for i in nodes[j].input} | graph_outputs
    return members, consumers, tuple(sorted(v for v in tainted if v in read_outside))


def _subgraphs(model: onnx.ModelProto, starts: Sequence[int]) -> list[RandomSubgraph]:
    if not starts:
        return []
    fixed, nodes = fixed_values(model) - data_values(model), model.graph.node
    graph_outputs = {o.name for o in model.graph.output}
    readers = _readers(nodes)
    found = []
    for start in starts:
        members, consumers, masks = _spread(nodes, start, fixed, graph_outputs, readers)
        node = nodes[start]
        found.append(
            RandomSubgraph(
                name=node.name or f"{node.op_type}#{start}", op=node.op_type, index=start,
                nodes=tuple(members), masks=masks, consumers=tuple(consumers),
            )
        )
    return found


def _is_dropout_draw(node: onnx.NodeProto) -> bool:
    """Whether ``node`` is the draw of a portable dropout (``graphtricks.onnx.portable``)."""
    return node.op_type in RANDOM_OPS and node.name.startswith(DROPOUT_TAG)


def random_subgraphs(model: onnx.ModelProto) -> list[RandomSubgraph]:
    """Describes every top-level random operator of ``model`` and what it feeds, in graph order.

    The draws of portable dropouts are left out (:func:`dropout_subgraphs`): PyTorch applies
    them as dropout, not as a random draw of its own.
    """
    nodes = model.graph.node
    return _subgraphs(
        model,
        [i for i, n in enumerate(nodes) if n.op_type in RANDOM_OPS and not _is_dropout_draw(n)],
    )


def dropout_subgraphs(model: onnx.ModelProto) -> list[RandomSubgraph]:
    """The draw of every portable dropout, the mask computed from it, and the ``Mul`` applying it."""
    nodes = model.graph.node
    return _subgraphs(model, [i for i, n in enumerate(nodes) if _is_dropout_draw(n)])


def _is_ones(node: onnx.NodeProto) -> bool:
    """Whether ``node`` is a ConstantOfShape filled with 1."""
    if node.op_type != "ConstantOfShape":
        return False
    value = next((a.t for a in node.attribute if a.name == "value"), None)
    return value is not None and bool((numpy_helper.to_array(value) == 1).all())


def mask_dropouts(model: onnx.ModelProto) -> list[RandomSubgraph]:
    """Every Dropout of a tensor of ones (channel dropout's mask), and what its mask feeds.

    ``torchscript.feature_dropout`` exports channel dropout as ``x * Dropout(ones(N, C, 1..))``:
    such a Dropout draws a mask, like a random operator, and its consumer (the ``Mul``) has no
    counterpart in the inference graph. A Dropout of data (or of a weight) is not one, nor is
    one whose mask reaches no data: it is left a Dropout of ones, which the inference graph lacks.
    """
    nodes = model.graph.node
    ones = {n.output[0] for n in nodes if _is_ones(n)}
    starts = [i for i, n in enumerate(nodes) if n.op_type == "Dropout" and n.input[0] in ones]
    return [sub for sub in _subgraphs(model, starts) if sub.consumers]


def _train_only(model: onnx.ModelProto) -> tuple[set[int], set[str]]:
    """Positions of the train-only nodes, and the values only they read as parameters."""
    nodes = model.graph.node
    subs = random_subgraphs(model) + mask_dropouts(model) + dropout_subgraphs(model)
    params: dict[int, set[str]] = {}  # train-only node -> the inputs it reads as parameters
    for i, node in enumerate(nodes):
        if node.op_type == "Dropout":
            params[i] = set(node.input[1:])  # ratio, training_mode; not the data
    for sub in subs:  # a mask Dropout is in sub.nodes: its ones are a parameter too
        params.update({j: set(nodes[j].input) for j in sub.nodes})
        params.update({j: set(nodes[j].input) & set(sub.masks) for j in sub.consumers})
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            readers.setdefault(name, []).append(i)
    graph_outputs = set(main_outputs([o.name for o in model.graph.output]))

    def parameter_only(value: str) -> bool:
        read = readers.get(value, [])
        return bool(read) and value not in graph_outputs and all(
            i in params and value in params[i] for i in read
        )

    # Backwards (graph order is topological, so readers are decided first): a node whose every
    # output only parameterises train-only nodes is train-only too, e.g. the Shape, Gather and
    # Concat that size a mask like the batch, or the Constant holding a keep probability.
    for j in range(len(nodes) - 1, -1, -1):
        outputs = [o for o in nodes[j].output if o]
        if j not in params and outputs and all(parameter_only(o) for o in outputs):
            params[j] = set(nodes[j].input)
    values = {v for i in params for v in params[i] if v and parameter_only(v)}
    return set(params), values


def train_only_output_nodes(model: onnx.ModelProto) -> tuple[set[int], set[str]]:
    """The nodes that compute only the train graph's ``train_only.*`` outputs (an auxiliary
    head), and the initializers only they read.

    A node is kept when a model output both modes return (not ``updated.*``) depends on it; a
    portable BatchNorm goes whole with its normalisation (its running-statistics nodes feed
    ``updated.*`` outputs only). Empty for a graph without train-only outputs.
    """
    names = [o.name for o in model.graph.output]
    if not any(n.startswith(TRAIN_ONLY_PREFIX) for n in names):
        return set(), set()
    nodes = model.graph.node
    producer = {v: i for i, node in enumerate(nodes) for v in node.output if v}
    needed: set[int] = set()
    pending = [producer[n] for n in main_outputs(names) if not n.startswith(TRAIN_ONLY_PREFIX)
               and n in producer]
    while pending:
        i = pending.pop()
        if i in needed:
            continue
        needed.add(i)
        pending += [producer[v] for v in nodes[i].input if v in producer]
    for positions in portable_batchnorm_groups(model).values():
        if needed & set(positions):
            needed |= set(positions)
    aux = set(range(len(nodes))) - needed
    read_elsewhere = {v for i in needed for v in nodes[i].input}
    inits = {init.name for init in model.graph.initializer}
    values = {v for i in aux for v in nodes[i].input if v in inits and v not in read_elsewhere}
    return aux, values


def train_only_nodes(model: onnx.ModelProto) -> set[int]:
    """Positions of the nodes the inference graph has no counterpart for.

    These are Dropout nodes, every random subgraph's nodes and their consumers (the inference
    graph passes ``x`` on where the train graph computes ``Mul(x, mask)``), and the nodes that
    only compute their parameters (a keep probability, the shape a mask is drawn like).
    """
    return _train_only(model)[0]


def train_only_feeds(model: onnx.ModelProto) -> set[str]:
    """Values only train-only nodes read as parameters: a Dropout's ratio and mode, a random
    subgraph's constants. A Dropout's or a consumer's data input is not one of them.
    """
    return _train_only(model)[1]


def _passed_on(model: onnx.ModelProto) -> dict[str, str]:
    """What each train-only node that passes data on passes on: its output -> its data input.

    A Dropout passes on its data; a random subgraph's consumer (``Mul(x, mask)``) its one input
    that is not a mask. In the inference graph, the readers of those outputs read that data.
    """
    nodes, passed = model.graph.node, {}
    for node in nodes:
        if node.op_type == "Dropout" and node.output:
            passed[node.output[0]] = node.input[0]
    for sub in random_subgraphs(model) + mask_dropouts(model) + dropout_subgraphs(model):
        for j in sub.consumers:
            data = {i for i in nodes[j].input if i and i not in sub.masks}
            if len(data) == 1 and len(nodes[j].output) == 1:
                passed[nodes[j].output[0]] = data.pop()
    return passed


def operator_multiset(model: onnx.ModelProto) -> Counter:
    """Counts ``(domain, op_type)`` of the computation both graphs share.

    Only the computation on data is counted (nodes with an output in :func:`data_values`):
    arithmetic on shapes and constants is the exporter's, which folds it or not depending on
    the mode (the TorchScript exporter folds constants in the inference graph only, and turns
    a shape into a constant where it knows it: timm NASNet's ``Conv2dSame`` padding). Train-only
    nodes (:func:`train_only_nodes`) are left out, their readers reading the data they pass on,
    and Transposes are folded as the exporter folds them
    (:func:`~graphtricks.onnx.graph.folded_operator_counts`): two Transposes around a Dropout
    cancel out in the inference graph only.
    """
    train_only = train_only_nodes(model) | train_only_output_nodes(model)[0]
    data, nodes = data_values(model), model.graph.node
    counted = {
        i for i, n in enumerate(nodes) if i not in train_only and any(o in data for o in n.output)
    }
    counts = folded_operator_counts([nodes[i] for i in sorted(counted)], _passed_on(model), main_outputs(
        [o.name for o in model.graph.output]
    ))
    # A portable BatchNorm (batch statistics in primitive ops) is one BatchNormalization, as in
    # the inference graph; its nodes are named graphtricks.bn.<k>.* (graphtricks.onnx.portable).
    for positions in portable_batchnorm_groups(model).values():
        if train_only.issuperset(positions):  # an auxiliary head's: no inference twin
            continue
        group = Counter(("ai.onnx", nodes[i].op_type) for i in positions if i in counted)
        counts.subtract(group)
        counts[("ai.onnx", "BatchNormalization")] += 1
    return +counts


def _elem_type(model: onnx.ModelProto, name: str, known: dict) -> int:
    """The ONNX element type of a value, by shape inference when no declaration says it.

    ``known`` keeps the model's constants and inferred shapes from one call to the next.
    """
    if "constants" not in known:
        known["constants"] = constant_values(model)
    consts = known["constants"]
    if name in consts:
        return helper.np_dtype_to_tensor_dtype(consts[name].dtype)
    if "inferred" not in known:
        known["inferred"] = shape_inference.infer_shapes(model)
    graph = known["inferred"].graph
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        if value.name == name and value.type.tensor_type.elem_type:
            return value.type.tensor_type.elem_type
    raise ValidationError(
        f"cannot tell the element type of '{name}', the input of a random operator, to make the "
        "train graph deterministic; export with a fixed dtype"
    )


def _fixed_draw(model: onnx.ModelProto, node: onnx.NodeProto, index: int, known: dict) -> list:
    """Nodes giving the fixed value of what ``node`` draws."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    out, prefix = node.output[0], f"graphtricks_fixed_draw_{index}"
    if node.op_type in ("RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike"):
        value = float(attrs.get("low" if "Uniform" in node.op_type else "mean", 0.0))
        if "Like" in node.op_type:
            dtype = attrs.get("dtype") or _elem_type(model, node.input[0], known)
            fill = numpy_helper.from_array(
                np.array([value], helper.tensor_dtype_to_np_dtype(dtype))
            )
            return [
                helper.make_node("Shape", [node.input[0]], [f"{prefix}_shape"]),
                helper.make_node("ConstantOfShape", [f"{prefix}_shape"], [out], value=fill),
            ]
        np_dtype = helper.tensor_dtype_to_np_dtype(attrs.get("dtype", onnx.TensorProto.FLOAT))
        filled = np.full(list(attrs["shape"]), value, np_dtype)
        return [helper.make_node("Constant", [], [out], value=numpy_helper.from_array(filled))]
    if node.op_type == "Bernoulli":  # u = 0 gives 1 wherever the probability is above 0
        p_type = _elem_type(model, node.input[0], known)
        zero = numpy_helper.from_array(np.zeros((), helper.tensor_dtype_to_np_dtype(p_type)))
        return [
            helper.make_node("Constant", [], [f"{prefix}_zero"], value=zero),
            helper.make_node("Less", [f"{prefix}_zero", node.input[0]], [f"{prefix}_kept"]),
            helper.make_node("Cast", [f"{prefix}_kept"], [out], to=attrs.get("dtype") or p_type),
        ]
    raise ValidationError(
        f"random operator {node.op_type} '{node.name}' cannot be made deterministic; "
        "the train graph cannot be compared with PyTorch"
    )


def deterministic_train_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a train graph with Dropout ratios 0 and every random operator fixed.

    Each random operator is replaced in place by nodes giving a fixed value: ``low`` for a
    uniform, ``mean`` for a normal, ``0 < p`` for a Bernoulli (what ``u < p`` gives at u = 0).
    Portable dropouts get ratio 0 and scale 1 first, so their fixed draw keeps everything.

    Args:
        model: The train graph; it is not changed.

    Returns:
        The deterministic copy.

    Raises:
        ValidationError: A random operator cannot be fixed (Multinomial, unknown dtype).
    """
    out = neutralised_portable_copy(neutralised_dropout_copy(model))
    known: dict = {}
    nodes = []
    for i, node in enumerate(out.graph.node):
        if node.op_type in RANDOM_OPS:
            nodes += _fixed_draw(out, node, i, known)
        else:
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out
