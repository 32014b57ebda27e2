"""Weights handed to ONNX Runtime in place must keep meaning what the graph says after its optimizers."""

from __future__ import annotations

import pytest
import torch

from graphtricks.onnx import export_pair, runtime, validate_pair


def test_convnext_layer_scale_validates_when_weights_are_shared_in_place(tmp_path):
    """ConvNeXt's (C, 1, 1) layer scale: ONNX Runtime's transpose optimizer reshaped it in the graph
    while the array handed in kept its shape ("broadcast an axis ... 4 by 384")."""
    torchvision = pytest.importorskip("torchvision")
    model, x = torchvision.models.convnext_tiny(weights=None).eval(), torch.randn(1, 3, 32, 32)
    export_pair(model, (x,), tmp_path)  # self-contained: validation maps its weights in place
    report = validate_pair(model, (x,), tmp_path, device="cpu", seeds=(0,))
    assert report.passed, report.summary()


def test_only_weight_operands_are_shared():
    import onnx
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Mul", ["y", "s"], ["z"]),
         helper.make_node("Add", ["z", "w2"], ["o"]), helper.make_node("Gemm", ["o", "w2"], ["p"])],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("p", onnx.TensorProto.FLOAT, None)],
    )
    shared = runtime._weight_operands(graph)
    assert "w" in shared
    assert "s" not in shared and "w2" not in shared  # a broadcast operand; read by Add too
