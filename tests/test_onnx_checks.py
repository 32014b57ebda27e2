"""Each check must fail on the defect it exists for, with a message naming what, where and how much.

Defects are made by editing exported ONNX files (so the tests do not depend on what the exporter
does), plus unit tests of the check functions on hand-made arrays and graphs.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from graphtricks.onnx import INFER_FILE, TRAIN_FILE, export_pair, validate_pair
from graphtricks.onnx.check_dropout import _measure, check_dropout_count
from graphtricks.onnx.check_graphs import check_infer_has_no_train_ops
from graphtricks.onnx.check_numeric import compare_output
from graphtricks.onnx.graph import DropoutInfo
from graphtricks.onnx.report import CheckResult, Tolerance, ValidationReport, default_tolerance
from tests.test_onnx_export import ConvBnNet


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.lin(x)
        return h, F.dropout(h.relu(), 0.2, self.training)


INPUTS = (torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = ConvBnNet()
    out = tmp_path_factory.mktemp("pair")
    export_pair(model, INPUTS, out)
    return model, out


def tampered(src: Path, dst: Path, which: str, edit: Callable[[onnx.ModelProto], None]) -> Path:
    """Copies the pair to ``dst`` and edits one of its graphs in place."""
    shutil.copytree(src, dst)
    path = dst / (TRAIN_FILE if which == "train" else INFER_FILE)
    graph = onnx.load(path)
    edit(graph)
    onnx.save(graph, path)
    return dst


def validate_tampered(exported, tmp_path: Path, which: str, edit) -> ValidationReport:
    """Validates a copy of the exported pair with one graph edited by ``edit``."""
    model, out = exported
    return validate_pair(model, INPUTS, tampered(out, tmp_path / "t", which, edit), device="cpu")


def by_name(report, name: str) -> list[CheckResult]:
    return [c for c in report.checks if c.name == name]


def test_untouched_pair_passes(exported):
    model, out = exported
    report = validate_pair(model, INPUTS, out, device="cpu", seeds=(0,))
    assert report.passed, report.summary()


def test_tampered_weight_fails_weights_and_inference_checks(exported, tmp_path):
    def bump(graph: onnx.ModelProto) -> None:
        init = next(i for i in graph.graph.initializer if i.name == "head.bias")
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 0.01, init.name))

    report = validate_tampered(exported, tmp_path, "infer", bump)
    (weights,) = by_name(report, "graphs_same_weights")
    assert not weights.passed and "head.bias" in weights.message
    failed = [c for c in by_name(report, "infer_vs_eager") if not c.passed]
    assert {c.seed for c in failed} == {0, 1, 2}
    assert "'output'" in failed[0].message and "seed=0" in failed[0].message
    assert "atol=1e-05" in failed[0].message and failed[0].max_abs == pytest.approx(0.01, rel=1e-3)
    assert not report.passed


def test_train_graph_with_inference_batchnorm_fails_deterministic_check(exported, tmp_path):
    def to_inference(graph: onnx.ModelProto) -> None:
        for node in graph.graph.node:
            if node.op_type == "BatchNormalization":
                node.attribute.remove(next(a for a in node.attribute if a.name == "training_mode"))
                node.attribute.append(helper.make_attribute("training_mode", 0))
                del node.output[1:]

    report = validate_tampered(exported, tmp_path, "train", to_inference)
    deterministic = by_name(report, "train_deterministic")
    assert deterministic and not any(c.passed for c in deterministic)
    assert deterministic[0].max_abs > 1e-2 and deterministic[0].atol == 1e-5
    assert all(c.passed for c in by_name(report, "infer_vs_eager"))


def test_eliminated_dropout_fails_count_check(exported, tmp_path):
    def to_identity(graph: onnx.ModelProto) -> None:
        node = next(n for n in graph.graph.node if n.op_type == "Dropout")
        identity = helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name)
        node.CopyFrom(identity)

    report = validate_tampered(exported, tmp_path, "train", to_identity)
    (count,) = by_name(report, "dropout_count")
    assert not count.passed and "eliminated" in count.message
    assert "0 active Dropout" in count.message and "applies 1" in count.message


def test_inert_dropout_fails_rate_check(exported, tmp_path):
    def inference_mode(graph: onnx.ModelProto) -> None:
        node = next(n for n in graph.graph.node if n.op_type == "Dropout")
        graph.graph.initializer.append(numpy_helper.from_array(np.array(False), "off"))
        node.input[2] = "off"

    report = validate_tampered(exported, tmp_path, "train", inference_mode)
    rates = by_name(report, "dropout_rate")
    assert rates and not any(c.passed for c in rates)
    assert "nothing dropped" in rates[0].message and rates[0].details["keep_rate"] == 1.0
    assert not by_name(report, "dropout_count")[0].passed


def test_missing_output_fails_io_and_count_checks(tmp_path):
    torch.manual_seed(0)
    model, inputs = TwoOutputs(), (torch.randn(8, 6),)
    export_pair(model, inputs, tmp_path / "pair")
    broken = tampered(tmp_path / "pair", tmp_path / "t", "infer", lambda g: g.graph.output.pop())
    report = validate_pair(model, inputs, broken, device="cpu", seeds=(0,))
    (io,) = by_name(report, "graphs_same_io")
    assert not io.passed and "outputs differ" in io.message
    (infer,) = by_name(report, "infer_vs_eager")
    assert not infer.passed and "PyTorch returns 2" in infer.message


def test_extra_operator_fails_operator_check(exported, tmp_path):
    def double_negate(graph: onnx.ModelProto) -> None:
        last = graph.graph.node[-1]
        name = last.output[0]
        last.output[0] = "pre"
        graph.graph.node.extend(
            [helper.make_node("Neg", ["pre"], ["neg"]), helper.make_node("Neg", ["neg"], [name])]
        )

    report = validate_tampered(exported, tmp_path, "infer", double_negate)
    (ops,) = by_name(report, "graphs_same_operators")
    assert not ops.passed and "Neg=(0, 2)" in ops.message
    assert all(c.passed for c in by_name(report, "infer_vs_eager"))


def test_dropout_in_inference_graph_is_flagged():
    node = helper.make_node("Dropout", ["x"], ["y"], name="d")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    result = check_infer_has_no_train_ops(helper.make_model(graph))
    assert not result.passed and "'d'" in result.message


def base(name: str = "c") -> CheckResult:
    return CheckResult(
        name=name, passed=False, message="", graph="infer", output="y", seed=3, inputs="seed=3"
    )


def test_compare_output_reports_nan_shape_dtype_and_error():
    tol = Tolerance(1e-5, 1e-4)
    ref = torch.tensor([1.0, 2.0, 3.0])
    assert compare_output(ref.numpy(), ref, tol, base()).passed
    bad = compare_output(np.array([1.0, np.nan, 3.0], np.float32), ref, tol, base())
    assert not bad.passed and "NaN/Inf" in bad.message
    assert "shape" in compare_output(np.zeros(2, np.float32), ref, tol, base()).message
    assert "dtype" in compare_output(ref.numpy().astype(np.float64), ref, tol, base()).message
    off = compare_output(np.array([1.0, 2.0, 3.01], np.float32), ref, tol, base())
    assert not off.passed and off.max_abs == pytest.approx(0.01, rel=1e-4)
    assert "'y'" in off.message and "seed=3" in off.message and "worst element (2,)" in off.message


def test_measure_catches_wrong_scale_and_wrong_rate():
    rng = np.random.default_rng(0)
    x = rng.normal(size=10_000).astype(np.float32)
    keep = rng.random(10_000) >= 0.25
    info = DropoutInfo("d", 0, "x", "y", ratio=0.25, training=True)
    good = _measure(info, x, np.where(keep, x / 0.75, 0).astype(np.float32), base("dropout_rate"))
    assert good.passed, good.message
    scaled = _measure(info, x, np.where(keep, x * 1.3, 0).astype(np.float32), base("dropout_rate"))
    assert not scaled.passed and "scaled" in scaled.message
    half = _measure(info, x, np.where(rng.random(10_000) >= 0.5, x / 0.75, 0), base("dropout_rate"))
    assert not half.passed and "sigma" in half.message


def test_dropout_count_compares_probabilities():
    infos = [DropoutInfo("a", 0, "x", "y", 0.1, True), DropoutInfo("b", 1, "y", "z", 0.5, True)]
    assert check_dropout_count(infos, [0.5, 0.1]).passed
    assert not check_dropout_count(infos, [0.5, 0.2]).passed
    assert not check_dropout_count(infos[:1], [0.5, 0.1]).passed


def test_default_tolerances_by_dtype_and_device():
    assert default_tolerance(torch.float32, "cpu") == Tolerance(1e-5, 1e-4)
    assert default_tolerance(torch.float16, "cpu").atol > 1e-5
    assert default_tolerance(torch.float32, "cuda").atol >= 1e-5
    assert default_tolerance(torch.int64, "cpu", atol=1.0) == Tolerance(0.0, 0.0)
    assert default_tolerance(torch.float32, "cpu", atol=1e-3) == Tolerance(1e-3, 1e-4)
