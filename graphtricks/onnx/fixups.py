"""Repairs of what the TorchScript exporter gets wrong or does differently in the two modes.

Each function edits a freshly exported graph in place and says what it changed, so the export
result can list every repair.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from graphtricks.onnx.graph import dropout_infos
from graphtricks.onnx.weights import tensor_value

__all__ = [
    "activate_untagged_dropouts",
    "restore_weights",
    "strip_inert_dropouts",
    "undo_initializer_dedup",
]


def activate_untagged_dropouts(train: onnx.ModelProto) -> list[str]:
    """Turns on training_mode for train-graph Dropouts exported without it.

    The TorchScript symbolic of ``scaled_dot_product_attention`` (also used by
    ``nn.MultiheadAttention``) emits ``Dropout(x, ratio)`` with no training_mode input, which
    ONNX reads as inference mode: the dropout would never happen. PyTorch applies SDPA's
    ``dropout_p`` whenever it is > 0, so in the train graph such a node must train.

    Returns:
        The names of the repaired nodes.
    """
    repaired, flag = [], None
    for info in dropout_infos(train):
        node = train.graph.node[info.index]
        has_mode = len(node.input) >= 3 and bool(node.input[2])
        if has_mode or not (info.ratio and info.ratio > 0):
            continue
        if flag is None:
            flag = "graphtricks_training_mode"
            train.graph.initializer.append(numpy_helper.from_array(np.array(True), flag))
        while len(node.input) < 2:
            node.input.append("")
        if len(node.input) == 2:
            node.input.append(flag)
        else:
            node.input[2] = flag
        repaired.append(info.name)
    return repaired


def _remove_dangling_constants(model: onnx.ModelProto) -> None:
    """Drops Constant nodes whose output nothing reads any more."""
    used = {name for n in model.graph.node for name in n.input}
    used.update(o.name for o in model.graph.output)
    kept = [n for n in model.graph.node if n.op_type != "Constant" or n.output[0] in used]
    del model.graph.node[:]
    model.graph.node.extend(kept)


def strip_inert_dropouts(infer: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Removes Dropouts that do nothing (training_mode off) from the inference graph.

    Consumers are rewired to the Dropout's input, so no Identity is left behind to upset the
    operator comparison; a Dropout feeding a graph output becomes an Identity instead.

    Returns:
        The names of removed nodes, and the names of Dropouts left because they train
        (the model drops out in eval mode).
    """
    removed, training = [], []
    graph_outputs = {o.name for o in infer.graph.output}
    rename: dict[str, str] = {}
    doomed = set()
    for info in dropout_infos(infer):
        node = infer.graph.node[info.index]
        if info.training is not False:
            training.append(info.name)
            continue
        mask_used = len(node.output) > 1 and node.output[1] and any(
            node.output[1] in n.input for n in infer.graph.node
        )
        if mask_used:
            training.append(info.name)
            continue
        if info.output in graph_outputs:
            identity = onnx.helper.make_node("Identity", [info.data], [info.output], name=node.name)
            infer.graph.node[info.index].CopyFrom(identity)
        else:
            rename[info.output] = info.data
            doomed.add(info.index)
        removed.append(info.name)
    kept = [n for i, n in enumerate(infer.graph.node) if i not in doomed]
    for node in kept:
        for i, name in enumerate(node.input):
            while name in rename:  # chains of Dropouts
                name = rename[name]
            node.input[i] = name
    del infer.graph.node[:]
    infer.graph.node.extend(kept)
    _remove_dangling_constants(infer)
    return removed, training


def undo_initializer_dedup(infer: onnx.ModelProto) -> list[str]:
    """Gives back their own initializer to weights the exporter merged into one.

    In eval mode the TorchScript exporter stores equal-valued weights once (e.g. all-zero
    biases) and links the others with ``Identity`` nodes; in train mode it does not. Undoing it
    keeps the two graphs' weights and operators comparable name for name.

    Returns:
        The names of the restored initializers.
    """
    values = {i.name: i for i in infer.graph.initializer}
    graph_outputs = {o.name for o in infer.graph.output}
    restored, kept = [], []
    for node in infer.graph.node:
        if (
            node.op_type == "Identity"
            and node.input[0] in values
            and node.output[0] not in graph_outputs
            and node.output[0] not in values
        ):
            clone = onnx.TensorProto()
            clone.CopyFrom(values[node.input[0]])
            clone.name = node.output[0]
            infer.graph.initializer.append(clone)
            restored.append(node.output[0])
        else:
            kept.append(node)
    del infer.graph.node[:]
    infer.graph.node.extend(kept)
    return restored


def restore_weights(model: onnx.ModelProto, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Resets initializers named like the model's parameters and buffers to their values.

    Exporting in train mode runs a forward that updates BatchNorm running statistics before
    they are captured, so the train graph would carry stats one step ahead of the model.

    Args:
        model: The exported graph.
        state: The model's tensors before export, by qualified name.

    Returns:
        The names of the initializers that were reset.
    """
    reset = []
    for init in model.graph.initializer:
        tensor = state.get(init.name)
        if tensor is None or tensor.dtype == torch.bfloat16:
            continue
        want = tensor.detach().cpu().numpy()
        have = tensor_value(init)
        same_kind = have.shape == want.shape and have.dtype == want.dtype
        if same_kind and have.tobytes() != want.tobytes():
            init.CopyFrom(numpy_helper.from_array(want, init.name))
            reset.append(init.name)
    return reset

