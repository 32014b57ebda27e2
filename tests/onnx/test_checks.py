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
from graphtricks.onnx.checks.dropout import _measure, check_dropout_count
from graphtricks.onnx.checks.graphs import (
    check_infer_has_no_train_ops,
    check_operators,
    check_weights,
    eager_mode_difference,
)
from graphtricks.onnx.checks.numeric import compare_output
from graphtricks.onnx.graph import DropoutInfo, folded_operator_counts
from graphtricks.onnx.report import (
    CheckResult,
    Tolerance,
    ValidationReport,
    default_tolerance,
)
from graphtricks.onnx.train_only import mask_dropouts, operator_multiset
from tests.onnx.test_export import ConvBnNet


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.lin(x)
        return h, F.dropout(h.relu(), 0.2, self.training)


INPUTS = (torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)


@pytest.fixture(scope="module", params=["portable", "standard"])
def exported(tmp_path_factory, request) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = ConvBnNet()
    out = tmp_path_factory.mktemp(f"pair_{request.param}")
    export_pair(model, INPUTS, out, train_graph=request.param)
    return model, out


def is_portable(graph: onnx.ModelProto) -> bool:
    return any(n.name.startswith("graphtricks.") for n in graph.graph.node)


def portable_group(graph: onnx.ModelProto, prefix: str) -> list[onnx.NodeProto]:
    return [n for n in graph.graph.node if n.name.startswith(prefix + ".")]


def remove_nodes(graph: onnx.ModelProto, doomed: list[onnx.NodeProto], add: list[onnx.NodeProto]) -> None:
    """Replaces ``doomed`` by ``add`` (at the first doomed node's place) and drops dangling outputs."""
    names = {n.name for n in doomed}
    at = next(i for i, n in enumerate(graph.graph.node) if n.name in names)
    kept = [n for n in graph.graph.node if n.name not in names]
    kept[at:at] = add
    del graph.graph.node[:]
    graph.graph.node.extend(kept)
    made = {o for n in graph.graph.node for o in n.output}
    outputs = [o for o in graph.graph.output if o.name in made]
    del graph.graph.output[:]
    graph.graph.output.extend(outputs)


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
        if is_portable(graph):  # batch statistics -> the inference-mode BatchNormalization
            group = portable_group(graph, "graphtricks.bn.0")
            made = {o for n in group for o in n.output}
            inits = {i.name for i in graph.graph.initializer}
            produced = {o for n in graph.graph.node for o in n.output}
            # the data the batch statistics read, and their normalised output a later node reads
            x = next(i for n in group for i in n.input if i in produced and i not in made)
            y = next(o for n in graph.graph.node if n not in group for o in n.input if o in made)
            assert x not in inits
            bn = helper.make_node("BatchNormalization", [x, "bn.weight", "bn.bias", "bn.running_mean",
                                  "bn.running_var"], [y], name="bn", training_mode=0)
            remove_nodes(graph, group, [bn])
            return
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
        if is_portable(graph):  # the whole random mask subgraph gone, its output = its data
            group = portable_group(graph, "graphtricks.dropout.0")
            apply = next(n for n in group if n.name.endswith(".apply"))
            identity = helper.make_node("Identity", [apply.input[0]], [apply.output[0]], name="drop")
            remove_nodes(graph, group, [identity])
            return
        node = next(n for n in graph.graph.node if n.op_type == "Dropout")
        identity = helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name)
        node.CopyFrom(identity)

    report = validate_tampered(exported, tmp_path, "train", to_identity)
    (count,) = by_name(report, "dropout_count")
    assert not count.passed and "eliminated" in count.message
    assert "0 active Dropout" in count.message and "applies 1" in count.message
    assert not report.passed


def test_inert_dropout_fails_rate_check(exported, tmp_path):
    def inference_mode(graph: onnx.ModelProto) -> None:
        if is_portable(graph):  # drops nothing: u >= -1 keeps every element
            keep = next(n for n in graph.graph.node if n.name == "graphtricks.dropout.0.keep")
            graph.graph.initializer.append(numpy_helper.from_array(np.array(-1, np.float32), "low"))
            keep.input[1] = "low"
            return
        node = next(n for n in graph.graph.node if n.op_type == "Dropout")
        graph.graph.initializer.append(numpy_helper.from_array(np.array(False), "off"))
        node.input[2] = "off"

    report = validate_tampered(exported, tmp_path, "train", inference_mode)
    rates = by_name(report, "dropout_rate")
    assert rates and not any(c.passed for c in rates)
    assert "nothing dropped" in rates[0].message and rates[0].details["keep_rate"] == 1.0
    assert not report.passed


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


# -- graph-vs-graph checks that must pass correct exports and still fail defects ---------------
class Transpose(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class TransposedLinear(nn.Module):
    """``x.t()`` through a Dropout into a Linear: the inference graph folds it into the Gemm."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.drop = nn.Linear(3, 2), nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x.t()))


class ScaleInTraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)
        return x * 0.5 if self.training else x


class InPlaceDropPath(nn.Module):
    """Stochastic depth drawn into ``new_empty`` and applied in place: only dropout-like calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.training:
            h.mul_(h.new_empty(h.shape[0], 1).bernoulli_(0.8).div_(0.8))
        return F.relu(h) + x


def _export(model: nn.Module, inputs: tuple, out: Path) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    # TorchScript's graphs: these tests are about the artefacts of its peephole pass and names
    result = export_pair(model, inputs, out, exporter="torchscript")
    return onnx.load(result.train_path), onnx.load(result.infer_path)


CANCELLING = (nn.Conv1d(3, 3, 1), Transpose(0, 2, 1), nn.Dropout(0.1), Transpose(0, 2, 1))
FUSING = (nn.Conv1d(3, 3, 1), Transpose(2, 0, 1), nn.Dropout(0.1), Transpose(0, 2, 1))


@pytest.mark.parametrize(
    ("model", "x"),
    [(nn.Sequential(*CANCELLING, nn.Flatten(1), nn.Linear(12, 1)), torch.randn(2, 3, 4)),
     (nn.Sequential(*FUSING, nn.Flatten(1)), torch.randn(2, 3, 4)),
     (TransposedLinear(), torch.randn(3, 5))],
    ids=["cancelling", "fusing", "into-gemm"],
)
def test_transposes_folded_in_the_inference_graph_pass(tmp_path, model, x):
    torch.manual_seed(0)
    train, infer = _export(model.eval(), (x,), tmp_path)
    transposes = [sum(n.op_type == "Transpose" for n in g.graph.node) for g in (train, infer)]
    assert transposes[0] > transposes[1]  # what the exporter folded in the inference graph only
    report = validate_pair(model, (x,), tmp_path, device="cpu", seeds=(0,))
    assert report.passed, report.summary()


def test_operator_check_still_fails_a_lost_transpose(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4)
    train, infer = _export(nn.Sequential(*FUSING, nn.Flatten(1)), (x,), tmp_path)
    (fused,) = [n for n in infer.graph.node if n.op_type == "Transpose"]  # two fused into one
    for node in infer.graph.node:
        node.input[:] = [fused.input[0] if i == fused.output[0] else i for i in node.input]
    infer.graph.node.remove(fused)
    result = check_operators(train, infer)
    assert not result.passed and "Transpose=(1, 0)" in result.message


def test_folded_operator_counts_on_hand_made_nodes():
    def t(src: str, dst: str, perm: list[int]) -> onnx.NodeProto:
        return helper.make_node("Transpose", [src], [dst], perm=perm)

    cancel = [t("x", "a", [0, 2, 1]), t("a", "b", [0, 2, 1]), helper.make_node("Relu", ["b"], ["y"])]
    assert folded_operator_counts(cancel, {}, ["y"]) == {("ai.onnx", "Relu"): 1}
    # through a removed node (rename d -> a), the pair meets and cancels too
    around = [t("x", "a", [1, 0]), t("d", "b", [1, 0]), helper.make_node("Neg", ["b"], ["y"])]
    assert folded_operator_counts(around, {"d": "a"}, ["y"]) == {("ai.onnx", "Neg"): 1}
    fuse = [t("x", "a", [1, 2, 0]), t("a", "y", [1, 2, 0])]  # composes to (2, 0, 1): one is left
    assert folded_operator_counts(fuse, {}, ["y"]) == {("ai.onnx", "Transpose"): 1}
    gemm = [t("x", "a", [1, 0]), helper.make_node("Gemm", ["a", "w"], ["y"])]
    assert folded_operator_counts(gemm, {}, ["y"]) == {("ai.onnx", "Gemm"): 1}
    read_twice = [t("x", "a", [1, 0]), helper.make_node("Gemm", ["a", "w"], ["g"]),
                  helper.make_node("Add", ["g", "a"], ["y"])]  # still read by Add: it stays
    assert folded_operator_counts(read_twice, {}, ["y"])[("ai.onnx", "Transpose")] == 1
    assert folded_operator_counts([t("x", "y", [1, 0])], {}, ["y"]) == {("ai.onnx", "Transpose"): 1}


def test_eager_mode_difference_sees_only_the_models_own_mode_dependence():
    torch.manual_seed(0)
    assert eager_mode_difference(ScaleInTraining(), (torch.randn(2, 2),)) == {"mul": (1, 0)}
    assert eager_mode_difference(ConvBnNet(), INPUTS) == {}  # Dropout and BatchNorm aside
    assert eager_mode_difference(InPlaceDropPath(), (torch.randn(4, 4),)) == {}


def test_operator_check_accepts_the_models_own_mode_difference_only(tmp_path):
    torch.manual_seed(0)
    model, x = nn.Sequential(ScaleInTraining(), nn.Linear(2, 1)).eval(), torch.randn(2, 2)
    train, infer = _export(model, (x,), tmp_path)
    own = lambda: eager_mode_difference(model, (x,))
    assert not check_operators(train, infer).passed  # without the model: the graphs must match
    explained = check_operators(train, infer, own)
    assert explained.passed and "as the model's own forward" in explained.message
    assert explained.details["eager_differing"] == {"mul": [1, 0]}
    # an operator only the inference graph has is not what the model's train-only Mul explains
    last = infer.graph.node[-1]
    last.output[0], name = "pre", last.output[0]
    infer.graph.node.append(helper.make_node("Neg", ["pre"], [name]))
    wrong = check_operators(train, infer, own)
    assert not wrong.passed and "Neg=(0, 1)" in wrong.message and "not as" in wrong.message


def test_operator_check_asks_for_the_models_mode_difference_only_when_counts_differ(exported):
    _, out = exported
    train, infer = onnx.load(out / TRAIN_FILE), onnx.load(out / INFER_FILE)

    def never() -> dict:
        raise AssertionError("called although both graphs have the same operators")

    assert check_operators(train, infer, never).passed


def test_untracked_batchnorm_is_no_train_op_but_a_tracked_one_in_train_mode_is(exported, tmp_path):
    torch.manual_seed(0)
    untracked = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False))
    _, infer = _export(untracked, (torch.randn(4, 2),), tmp_path)
    result = check_infer_has_no_train_ops(infer)
    # the inference twin writes eval-mode batch statistics as primitive ops (graphtricks.bn.*)
    assert result.passed and any(n.name.startswith("graphtricks.bn.0") for n in infer.graph.node)
    _, out = exported  # ConvBnNet's inference graph with its BatchNorm turned to train mode
    tracked = onnx.load(out / INFER_FILE)
    (bn,) = [n for n in tracked.graph.node if n.op_type == "BatchNormalization"]
    for attribute in [a for a in bn.attribute if a.name == "training_mode"]:  # absent: 0
        bn.attribute.remove(attribute)
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    flagged = check_infer_has_no_train_ops(tracked)
    assert not flagged.passed and flagged.details["offenders"] == [bn.name]


def test_channel_dropout_mask_that_reaches_no_data_fails(tmp_path):
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout2d(0.2)).eval(), torch.randn(2, 3, 4, 4)
    export_pair(model, (x,), tmp_path / "pair", train_graph="standard")
    assert validate_pair(model, (x,), tmp_path / "pair", device="cpu", seeds=(0,)).passed

    def unapplied(graph: onnx.ModelProto) -> None:  # Mul(x, mask) -> Identity(x)
        mul = next(n for n in graph.graph.node if n.op_type == "Mul")
        mul.CopyFrom(helper.make_node("Identity", [mul.input[0]], [mul.output[0]], name=mul.name))

    broken = tampered(tmp_path / "pair", tmp_path / "t", "train", unapplied)
    (ops,) = by_name(validate_pair(model, (x,), broken, device="cpu", seeds=(0,)), "graphs_same_operators")
    # the ones the mask is drawn like are no computation on data: only the Identity is counted
    assert not ops.passed and "Identity=(1, 0)" in ops.message and "ConstantOfShape" not in ops.message


def test_dropout_of_a_weight_is_no_mask_dropout():
    nodes = [helper.make_node("ConstantOfShape", ["s"], ["ones"], value=numpy_helper.from_array(
                 np.ones(1, np.float32))),
             helper.make_node("Dropout", ["w", "r", "t"], ["dw"]), helper.make_node("Add", ["x", "dw"], ["y"]),
             helper.make_node("Dropout", ["ones", "r", "t"], ["m"]), helper.make_node("Mul", ["y", "m"], ["z"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(v, k) for k, v in
         {"w": np.ones(2, np.float32), "s": np.array([2]), "r": np.array(0.1, np.float32),
          "t": np.array(True)}.items()],
    )
    model = helper.make_model(graph)
    assert [sub.index for sub in mask_dropouts(model)] == [3]  # not the Dropout of w
    assert operator_multiset(model) == {("ai.onnx", "Add"): 1}  # the mask's Mul is train-only


def test_portable_mask_that_reaches_no_data_fails(tmp_path):
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout2d(0.2)).eval(), torch.randn(8, 3, 4, 4)
    export_pair(model, (x,), tmp_path / "pair")
    assert validate_pair(model, (x,), tmp_path / "pair", device="cpu", seeds=(0,)).passed

    def unapplied(graph: onnx.ModelProto) -> None:  # Mul(data, mask) -> Identity(data)
        mask = next(n for n in graph.graph.node if n.name == "graphtricks.dropout.0.mask").output[0]
        mul = next(n for n in graph.graph.node if n.op_type == "Mul" and mask in n.input)
        data = next(i for i in mul.input if i != mask)
        mul.CopyFrom(helper.make_node("Identity", [data], [mul.output[0]], name=mul.name))

    broken = tampered(tmp_path / "pair", tmp_path / "t", "train", unapplied)
    report = validate_pair(model, (x,), broken, device="cpu", seeds=(0,))
    (ops,) = by_name(report, "graphs_same_operators")
    assert not ops.passed and "Identity=(1, 0)" in ops.message
    (rate,) = by_name(report, "dropout_rate")
    assert not rate.passed and "not data * mask" in rate.message


def _matmul_graph(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``y = x @ W0 @ W1 ...``, one MatMul per initializer, named as given."""
    nodes, prev = [], "x"
    for i, name in enumerate(weights):
        nodes.append(helper.make_node("MatMul", [prev, name], [f"h{i}"]))
        prev = f"h{i}"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(prev, onnx.TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return helper.make_model(graph)


def test_weights_check_matches_by_name_then_by_content():
    a, b = np.eye(4, dtype=np.float32), np.full((4, 4), 2, np.float32)
    train = _matmul_graph({"fc.weight": a, "head.weight": b})
    renamed = check_weights(train, _matmul_graph({"fc.weight": a, "onnx::MatMul_7": b}))
    assert renamed.passed, renamed.message
    changed = check_weights(train, _matmul_graph({"fc.weight": a, "onnx::MatMul_7": b + 1}))
    assert not changed.passed
    assert changed.details["only_train"] == ["head.weight"]
    assert changed.details["only_infer"] == ["onnx::MatMul_7"]
    other_shape = check_weights(train, _matmul_graph({"fc.weight": a, "w": b.reshape(2, 8)}))
    assert other_shape.details["only_train"] == ["head.weight"]
