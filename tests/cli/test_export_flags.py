"""``graphtricks export``'s exporter, dynamic-dimension and MC-dropout options."""

from __future__ import annotations

import json

import onnx
from typer.testing import CliRunner

from graphtricks.cli import app
from tests.conftest import ROOT

runner = CliRunner()
CNN = f"{ROOT}/models/plain_cnn.py:PlainCNN"
FLOW = f"{ROOT}/models/control_flow.py:DataDependent"


def _rewritten(tmp_path, spec: str = CNN, shape: str = "2,3,32,32") -> str:
    out = str(tmp_path / "model")
    result = runner.invoke(app, ["rewrite", spec, "--input-shape", shape, "--dropout", "0.1", "--out", out])
    assert result.exit_code == 0, result.output
    return out


def test_export_json_says_which_exporter_wrote_each_graph_and_writes_the_mc_graph(tmp_path):
    out = _rewritten(tmp_path)
    result = runner.invoke(app, ["export", out, "--mc-dropout", "--dynamic-batch", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["exporter"] == "dynamo"
    assert set(report["graph_exporters"]) == {"model.train.onnx", "model.infer.onnx", "model.mc.onnx"}
    assert report["mc_path"].endswith("model.mc.onnx") and report["dynamic_dims"] == {"x": [0]}
    mc = onnx.load(report["mc_path"])
    assert "RandomUniformLike" in [n.op_type for n in mc.graph.node]
    assert mc.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    result = runner.invoke(app, ["validate", out])
    assert result.exit_code == 0, result.output


def test_torchscript_is_selectable_and_the_fallback_is_noted(tmp_path):
    out = _rewritten(tmp_path)
    result = runner.invoke(app, ["export", out, "--exporter", "torchscript"])
    assert result.exit_code == 0, result.output
    assert "torchscript exporter" in result.stdout
    (tmp_path / "flow").mkdir()
    flow = _rewritten(tmp_path / "flow", FLOW, "2,3,16,16")
    result = runner.invoke(app, ["export", flow])
    assert result.exit_code == 0, result.output
    assert "instead of torch.export" in result.output and "torchscript exporter" in result.stdout


def test_malformed_or_unknown_dynamic_dim_is_one_red_line(tmp_path):
    out = _rewritten(tmp_path)
    for bad, words in (("x", "write INPUT:DIM"), ("x:two", "write INPUT:DIM"), ("nope:1", "does not have")):
        result = runner.invoke(app, ["export", out, "--dynamic-dim", bad])
        assert result.exit_code == 1
        assert words in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
