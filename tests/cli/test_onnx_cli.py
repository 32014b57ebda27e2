"""`graphtricks export` and `validate` from the command line, including bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from graphtricks.cli import app
from tests.conftest import ROOT

runner = CliRunner()
CNN = f"{ROOT}/models/plain_cnn.py:PlainCNN"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "cnn"
    result = runner.invoke(app, ["rewrite", CNN, "--input-shape", "4,3,32,32", "--dropout", "0.1", "--out", str(folder)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["export", str(folder)])
    assert result.exit_code == 0, result.output
    return folder


def test_export_and_validate_a_rewritten_model(exported):
    assert (exported / "model.train.onnx").is_file() and (exported / "model.infer.onnx").is_file()
    result = runner.invoke(app, ["validate", str(exported), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["device"] == "cpu"
    names = {c["name"] for c in report["checks"]}
    assert {"infer_vs_eager", "train_deterministic", "dropout_rate", "graphs_same_weights", "no_side_effects"} <= names
    rates = [c for c in report["checks"] if c["name"] == "dropout_rate"]
    assert len({c["details"].get("node") or c["output"] for c in rates}) >= 3


def test_validate_with_user_inputs(exported, tmp_path):
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    result = runner.invoke(app, ["validate", str(exported), "--inputs", str(tmp_path / "x.npz"), "--json"])
    assert result.exit_code == 0, result.output
    assert any(c["seed"] is None for c in json.loads(result.stdout)["checks"] if c["name"] == "infer_vs_eager")


def test_export_spec_needs_out_and_writes_the_saved_model(tmp_path):
    result = runner.invoke(app, ["export", CNN, "--input-shape", "2,3,32,32"])
    assert result.exit_code == 1 and "--out" in result.output
    result = runner.invoke(app, ["export", CNN, "--input-shape", "2,3,32,32", "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "e" / "recipe.toml").is_file()
    assert runner.invoke(app, ["validate", str(tmp_path / "e")]).exit_code == 0


def test_tampered_weight_fails_validation(exported, tmp_path):
    import shutil

    folder = tmp_path / "tampered"
    shutil.copytree(exported, folder)
    graph = onnx.load(folder / "model.infer.onnx")
    biggest = max(graph.graph.initializer, key=lambda t: np.prod(t.dims))
    array = onnx.numpy_helper.to_array(biggest).copy()
    array.flat[0] += 1.0
    biggest.CopyFrom(onnx.numpy_helper.from_array(array, biggest.name))
    onnx.save(graph, folder / "model.infer.onnx")
    result = runner.invoke(app, ["validate", str(folder)])
    assert result.exit_code == 1
    assert "graphs_same_weights" in result.output


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", "not found"),
        ("truncated", "truncated"),
        ("no_model", "no graphtricks model"),
    ],
)
def test_validate_bad_folders_are_one_line(exported, tmp_path, setup, message):
    import shutil

    folder = tmp_path / setup
    if setup == "no_model":
        folder.mkdir()
    else:
        shutil.copytree(exported, folder)
        if setup == "missing":
            (folder / "model.train.onnx").unlink()
        else:
            data = (folder / "model.infer.onnx").read_bytes()
            (folder / "model.infer.onnx").write_bytes(data[: len(data) // 2])
    result = runner.invoke(app, ["validate", str(folder)])
    assert result.exit_code == 1, result.output
    assert message in result.output.lower() and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_truncated_weights_are_one_line(exported, tmp_path):
    import shutil

    folder = tmp_path / "w"
    shutil.copytree(exported, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    for command in (["validate", str(folder)], ["inspect", str(folder)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 1 and "model.safetensors" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_unsupported_opset_is_one_line(tmp_path):
    result = runner.invoke(app, ["export", CNN, "--input-shape", "2,3,32,32", "--out", str(tmp_path / "o"), "--opset", "9"])
    assert result.exit_code == 1 and "opset 9 is not supported" in result.output
    assert not (tmp_path / "o").exists()


def test_validate_inputs_file_arrays_by_name_or_unnamed_in_order(exported, tmp_path):
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "unnamed.npz", x)
    result = runner.invoke(app, ["validate", str(exported), "--inputs", str(tmp_path / "unnamed.npz")])
    assert result.exit_code == 0, result.output
    np.savez(tmp_path / "misnamed.npz", image=x)
    result = runner.invoke(app, ["validate", str(exported), "--inputs", str(tmp_path / "misnamed.npz")])
    assert result.exit_code == 1
    assert "names image that no graph input has; the graphs take x" in result.output
    assert "Traceback" not in result.output
