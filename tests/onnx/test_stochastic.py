"""Stochastic depth (timm DropPath, torchvision StochasticDepth) through export and validation.

The pair must pass as exported, and each check on the random subgraphs must fail on the defect
it exists for: a lost or inert stochastic depth, a wrong scale, a wrong keep probability, a
random operator in the inference graph, an extra operator beside the train-only ones.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from graphtricks.onnx import INFER_FILE, TRAIN_FILE, export_pair, validate_pair
from graphtricks.onnx.checks.graphs import check_infer_has_no_train_ops, check_operators
from graphtricks.onnx.eager import DropoutInterceptor
from graphtricks.onnx.runtime import make_session
from graphtricks.onnx.train_only import deterministic_train_copy, random_subgraphs

timm_layers = pytest.importorskip("timm.layers")
tv_ops = pytest.importorskip("torchvision.ops")


class ResidualStochasticNet(nn.Module):
    """Two residual branches, one with timm DropPath, one with torchvision StochasticDepth."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.drop_path = timm_layers.DropPath(0.3)
        self.depth = tv_ops.StochasticDepth(0.2, "row")
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x).relu()
        h = h + self.drop_path(self.a(h).relu())
        h = h + self.depth(self.b(h))
        return self.head(h.mean((2, 3)))


INPUTS = (torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = ResidualStochasticNet().eval()
    out = tmp_path_factory.mktemp("stochastic")
    export_pair(model, INPUTS, out, exporter="torchscript")  # edits below assume its Less/Div form
    return model, out


def validate_edited(exported, tmp_path: Path, which: str, edit):
    """Validates a copy of the pair whose ``which`` graph was edited by ``edit``."""
    model, out = exported
    shutil.copytree(out, tmp_path / "t")
    path = tmp_path / "t" / (TRAIN_FILE if which == "train" else INFER_FILE)
    graph = onnx.load(path)
    edit(graph)
    onnx.save(graph, path)
    return validate_pair(model, INPUTS, tmp_path / "t", device="cpu", seeds=(0,))


def by_name(report, name: str) -> list:
    return [c for c in report.checks if c.name == name]


def _constant_input(graph: onnx.ModelProto, op: str, position: int, value: float) -> None:
    """Sets the Constant read as input ``position`` of the first random subgraph's ``op``."""
    sub = random_subgraphs(graph)[0]
    node = next(graph.graph.node[j] for j in sub.nodes if graph.graph.node[j].op_type == op)
    const = next(n for n in graph.graph.node if n.output[0] == node.input[position])
    old = numpy_helper.to_array(const.attribute[0].t)
    const.attribute[0].t.CopyFrom(numpy_helper.from_array(np.full_like(old, value)))


def test_exported_pair_passes_with_both_stochastic_depths_measured(exported):
    model, out = exported
    report = validate_pair(model, INPUTS, out, device="cpu", seeds=(0,))
    assert report.passed, report.summary()
    (count,) = by_name(report, "random_draw_count")
    assert "2 random operator(s)" in count.message and "draws 2 time(s)" in count.message
    rates = by_name(report, "random_draw_rate")
    assert len(rates) == 2 and all(r.details["conclusive"] for r in rates)
    keep = sorted(r.details["keep_probability"] for r in rates)
    assert keep == pytest.approx([0.7, 0.8])
    assert "x1.42857" in rates[0].message and "1/keep_prob=1.42857" in rates[0].message
    train, infer = onnx.load(out / TRAIN_FILE), onnx.load(out / INFER_FILE)
    assert random_subgraphs(infer) == [] and len(random_subgraphs(train)) == 2


def test_inert_stochastic_depth_fails_rate_check_only(exported, tmp_path):
    # Less(u, 1.0) keeps every sample, still scaled: the deterministic check cannot tell
    always = lambda g: _constant_input(g, "Less", 1, 1)
    report = validate_edited(exported, tmp_path, "train", always)
    failed = [c for c in report.checks if not c.passed]
    assert [c.name for c in failed] == ["random_draw_rate"]
    assert "kept 100000/100000" in failed[0].message and "5-sigma" in failed[0].message


def test_wrong_scale_fails_deterministic_check(exported, tmp_path):
    report = validate_edited(exported, tmp_path, "train", lambda g: _constant_input(g, "Div", 1, 1))
    deterministic = by_name(report, "train_deterministic")
    assert deterministic and not any(c.passed for c in deterministic)
    assert all(c.passed for c in by_name(report, "random_draw_rate"))  # survivors x1 is 2-valued


def test_lost_stochastic_depth_fails_count_and_deterministic_checks(exported, tmp_path):
    def drop_first(graph: onnx.ModelProto) -> None:  # the mask becomes a constant 1
        sub = random_subgraphs(graph)[0]
        mask = sub.masks[0]
        one = numpy_helper.from_array(np.ones((), np.float32), mask)
        kept = [n for j, n in enumerate(graph.graph.node) if j not in sub.nodes]
        del graph.graph.node[:]
        graph.graph.node.extend([helper.make_node("Constant", [], [mask], value=one), *kept])

    report = validate_edited(exported, tmp_path, "train", drop_first)
    (count,) = by_name(report, "random_draw_count")
    assert not count.passed and "1 random operator(s)" in count.message
    assert "lost, added or changed" in count.message
    assert not any(c.passed for c in by_name(report, "train_deterministic"))


def test_extra_operator_beside_stochastic_depth_fails_operator_check(exported):
    _, out = exported
    train, infer = onnx.load(out / TRAIN_FILE), onnx.load(out / INFER_FILE)
    assert check_operators(train, infer).passed
    consumer = train.graph.node[random_subgraphs(train)[0].consumers[0]]
    scaled = consumer.output[0] + "_scaled"
    for node in train.graph.node:
        node.input[:] = [scaled if i == consumer.output[0] else i for i in node.input]
    train.graph.initializer.append(numpy_helper.from_array(np.ones((), np.float32), "one"))
    train.graph.node.append(helper.make_node("Mul", [consumer.output[0], "one"], [scaled]))
    result = check_operators(train, infer)
    assert not result.passed and "Mul=" in result.message


def test_random_operator_in_inference_graph_is_flagged(exported):
    _, out = exported
    train = onnx.load(out / TRAIN_FILE)
    result = check_infer_has_no_train_ops(train)
    assert not result.passed and "RandomUniformLike" in result.message


def test_deterministic_copy_fixes_every_random_operator():
    nodes = [
        helper.make_node("RandomUniformLike", ["x"], ["u"], low=0.5, high=2.0),
        helper.make_node("RandomNormal", [], ["n"], shape=[2, 3], mean=0.25),
        helper.make_node("Bernoulli", ["x"], ["b"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_empty_tensor_value_info(n) for n in ("u", "n", "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    fixed = deterministic_train_copy(model)
    assert not {n.op_type for n in fixed.graph.node} & {"RandomUniformLike", "RandomNormal"}
    x = np.array([[0.0, 0.3, 1.0]] * 2, np.float32)
    u, n, b = make_session(fixed, "cpu", "fixed").run({"x": x})
    assert (u == 0.5).all() and u.dtype == np.float32 and (n == 0.25).all() and n.shape == (2, 3)
    np.testing.assert_array_equal(b, (x > 0).astype(np.float32))  # u=0 < p wherever p > 0


def test_interceptor_fixes_stochastic_depth_at_all_kept_and_records_it():
    x = torch.randn(6, 4)
    modules = ((timm_layers.DropPath(0.25), 0.75), (tv_ops.StochasticDepth(0.4, "row"), 0.6))
    for module, keep in modules:
        module.train()
        with DropoutInterceptor(neutralise=True) as seen:
            y = module(x)
        torch.testing.assert_close(y, x / keep)
        assert [(d.kind, d.p) for d in seen.draws] == [("bernoulli", pytest.approx(keep))]
        with DropoutInterceptor(neutralise=False) as seen:
            ys = [module(x) for _ in range(20)]
        assert any((y == 0).all(dim=1).any() for y in ys) and len(seen.draws) == 20
