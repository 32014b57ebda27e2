"""Validation of an MC-dropout graph (``model.mc.onnx``, graph ``mc``): passes when right, fails on each defect.

Until the exporter writes ``model.mc.onnx`` itself, the MC graph here is made with the exporter
there is: the portable train graph of a copy of the model whose BatchNorms stay in eval mode
(every dropout as portable random ops, BatchNorm on running statistics, no ``updated.*``).
"""

from __future__ import annotations

import copy
import shutil
import types
from pathlib import Path

import onnx
import pytest
import torch
from onnx import helper
from torch import nn

import graphtricks as gt
from graphtricks.onnx import export_pair, validate_pair
from graphtricks.onnx.checks.mc import masks_exposed_copy, check_mc_fresh_masks
from graphtricks.onnx.inputs import InputSet
from graphtricks.onnx.runtime import make_session
from graphtricks.onnx.names import INFER_FILE, MC_FILE, TRAIN_FILE

pytest.importorskip("onnxruntime")

MC_CHECKS = {"mc_eval_elsewhere", "mc_same_io", "mc_same_weights", "mc_vs_eager", "mc_batch_independent",
             "dropout_count", "dropout_rate", "mc_fresh_masks"}


def _eval_only(self, mode=True):
    self.training = False
    return self


def write_mc_graph(model: nn.Module, inputs: tuple, out: Path, scratch: Path, **export) -> Path:
    """``out/model.mc.onnx``: the train graph of a copy whose BatchNorms ignore train()."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train = types.MethodType(_eval_only, m)
    result = export_pair(twin, inputs, scratch, **export)
    return Path(shutil.copy(result.train_path, out / MC_FILE))


def conv_bn_net() -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5))
    with torch.no_grad():  # running statistics far from any batch's: a train-mode BatchNorm cannot pass for eval
        base[1].running_mean.uniform_(-1, 1)
        base[1].running_var.uniform_(0.5, 2)
    return gt.rewrite(base, [gt.InsertDropout(p=0.3)], example_inputs=(torch.randn(2, 3, 6, 6),)).model.eval()


INPUTS = (torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0)),)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = conv_bn_net()
    out = tmp_path_factory.mktemp("pair")
    export_pair(model, INPUTS, out)
    write_mc_graph(model, INPUTS, out, tmp_path_factory.mktemp("mc"))
    return model, out


def _validate_with(exported, tmp_path: Path, edit=None, source: str = MC_FILE):
    """Validate a copy of the folder whose MC graph is ``source`` (a file of the folder), edited."""
    model, out = exported
    folder = tmp_path / "pair"
    shutil.copytree(out, folder)
    graph = onnx.load(out / source)
    if edit is not None:
        edit(graph)
    onnx.save(graph, folder / MC_FILE)
    return validate_pair(model, INPUTS, folder, device="cpu", seeds=(0,))


def _mc(report, name):
    return [c for c in report.checks if c.graph == "mc" and c.name == name]


def test_an_mc_graph_passes_every_mc_check(exported):
    model, out = exported
    report = validate_pair(model, INPUTS, out, device="cpu")
    assert report.passed, report.summary()
    assert {c.name for c in report.checks if c.graph == "mc"} == MC_CHECKS
    assert len(_mc(report, "mc_vs_eager")) == 3  # one per seed
    assert {"mc_deterministic", "mc_dropout", "mc"} <= set(report.providers)


def test_a_train_graph_in_its_place_fails_the_eval_and_batch_tests(exported, tmp_path):
    report = _validate_with(exported, tmp_path, source=TRAIN_FILE)
    assert not report.passed
    for name in ("mc_eval_elsewhere", "mc_batch_independent", "mc_vs_eager"):
        assert not all(c.passed for c in _mc(report, name)), name
    assert "batch statistics" in _mc(report, "mc_batch_independent")[0].message


def test_an_inference_graph_in_its_place_fails_the_dropout_count(exported, tmp_path):
    report = _validate_with(exported, tmp_path, source=INFER_FILE)
    count = _mc(report, "dropout_count")
    assert count and not count[0].passed
    assert _mc(report, "mc_vs_eager")[0].passed  # it does equal eval: the count is what tells


def test_a_draw_that_is_not_random_fails_the_fresh_mask_test(exported, tmp_path):
    def fixed_draws(graph):  # the "uniform" draw becomes a function of the data: the same mask every run
        for node in graph.graph.node:
            if node.op_type == "RandomUniformLike":
                node.op_type = "Sigmoid"
                del node.attribute[:]

    report = _validate_with(exported, tmp_path, fixed_draws)
    assert not report.passed and not _mc(report, "dropout_count")[0].passed  # no random draw: no MC dropout found


@pytest.mark.parametrize("op, fresh", [("RandomUniformLike", True), ("Sigmoid", False)])
def test_fresh_masks_tell_a_random_draw_from_a_fixed_one(op, fresh):
    attrs = {"dtype": onnx.TensorProto.FLOAT} if op == "RandomUniformLike" else {}
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["u"], **attrs), helper.make_node("Relu", ["u"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = make_session(masks_exposed_copy(model, ["u"]), "cpu", "mc")
    inputs = InputSet("seed=0", 0, (torch.randn(4, 64),))
    [result] = check_mc_fresh_masks(session, ["u"], [0.5], inputs)
    assert result.passed is fresh and result.details["conclusive"]


def test_a_wrong_scale_fails_the_keep_rate_test(exported, tmp_path):
    def halve_scale(graph):
        for init in graph.graph.initializer:
            if init.name.startswith("graphtricks.dropout.") and init.name.endswith(".scale"):
                value = onnx.numpy_helper.to_array(init) * 0.5
                init.CopyFrom(onnx.numpy_helper.from_array(value.astype(value.dtype), init.name))

    report = _validate_with(exported, tmp_path, halve_scale)
    rates = _mc(report, "dropout_rate")
    assert rates and not any(c.passed for c in rates)


def test_a_weight_that_differs_from_the_inference_graph_fails(exported, tmp_path):
    def nudge(graph):  # the first float weight of the model (not a shape, not a dropout constant)
        for init in graph.graph.initializer:
            value = onnx.numpy_helper.to_array(init)
            if value.dtype == "float32" and value.size > 1 and not init.name.startswith(("graphtricks.", "constant")):
                init.CopyFrom(onnx.numpy_helper.from_array(value + value.dtype.type(1e-3), init.name))
                return

    report = _validate_with(exported, tmp_path, nudge)
    assert not _mc(report, "mc_same_weights")[0].passed


def test_an_mc_graph_with_a_fixed_batch_beside_a_dynamic_pair_fails_its_io_check(exported, tmp_path):
    model, out = exported  # its MC graph has batch 4 fixed
    folder = tmp_path / "dynamic"
    export_pair(model, INPUTS, folder, dynamic_batch=True)
    shutil.copy(out / MC_FILE, folder / MC_FILE)
    report = validate_pair(model, INPUTS, folder, device="cpu", seeds=(0,))
    io = _mc(report, "mc_same_io")[0]
    assert not io.passed and "dim 0: 4 in the MC graph" in io.message
    assert any("does not take input set" in n for n in report.notes)
    assert all(c.passed for c in _mc(report, "mc_vs_eager"))  # the sets it takes still ran


@pytest.mark.slow
def test_a_torchvision_model_with_its_own_and_inserted_dropout_passes(tmp_path):
    from graphtricks.io.specs import load_model

    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    base = load_model("tv:mobilenet_v3_small", {}).eval()  # BatchNorm, Hardswish, squeeze-excitation, its own Dropout
    x = (torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)),)
    model = gt.rewrite(base, [gt.InsertDropout(p=0.1)], example_inputs=x).model.eval()
    export_pair(model, x, tmp_path / "pair")
    write_mc_graph(model, x, tmp_path / "pair", tmp_path / "scratch")
    report = validate_pair(model, x, tmp_path / "pair", device="cpu", seeds=(0,))
    assert report.passed, report.summary()
    [count] = _mc(report, "dropout_count")
    assert len(count.details["pytorch_p"]) > 10  # the inserted dropouts and the classifier's own


def test_one_example_with_a_dynamic_batch_is_tested_on_a_batch_of_two(tmp_path):
    model = conv_bn_net()
    one = (INPUTS[0][:1],)
    export_pair(model, one, tmp_path / "pair", dynamic_batch=True)
    write_mc_graph(model, one, tmp_path / "pair", tmp_path / "scratch", dynamic_batch=True)
    report = validate_pair(model, one, tmp_path / "pair", device="cpu", seeds=(0,))
    [independent] = _mc(report, "mc_batch_independent")
    assert independent.passed and independent.details == {"batch": 2, "conclusive": True}
