"""The CLI: the README's commands, JSON output, chaining, and every bad input a one-line error."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import graphtricks as gt
from graphtricks.cli import app
from tests.conftest import ROOT

runner = CliRunner()
CNN = f"{ROOT}/models/plain_cnn.py:PlainCNN"
SHAPE = ["--input-shape", "4,3,32,32"]


def run(*args: str):
    return runner.invoke(app, list(args))


def test_rewrite_writes_the_folder_and_load_rebuilds_it(tmp_path):
    out = tmp_path / "cnn"
    result = run("rewrite", CNN, *SHAPE, "--dropout", "0.1", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "3 changes" in result.output
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "recipe.toml", "report.json", "model_code.py"}
    report = json.loads((out / "report.json").read_text())
    assert [c["where"] for c in report["changes"]] == ["features.2", "features.5", "features.8"]
    model = gt.load(out).eval()
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 3


def test_json_output_is_only_json(tmp_path):
    result = run("rewrite", CNN, *SHAPE, "--dropout", "0.1", "--out", str(tmp_path / "o"), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["report"]["changes_by_pass"] == {"dropout": 3}
    assert payload["recipe"] == [{"pass": "dropout", "p": 0.1, "kind": "element"}]


def test_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "never"
    result = run("rewrite", CNN, *SHAPE, "--dropout", "0.1", "--out", str(out), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "dry run" in result.output and not out.exists()


def test_rewrites_chain_and_recipes_replay(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert run("rewrite", CNN, *SHAPE, "--dropout", "0.1", "--include", "features.2", "--out", str(first)).exit_code == 0
    result = run("rewrite", str(first), "--dropout", "0.2", "--out", str(second))
    assert result.exit_code == 0, result.output
    recipe = gt.recipe.read_recipe(second / "recipe.toml")
    assert [p["p"] for p in recipe.passes] == [0.1, 0.2]
    model = gt.load(second)
    ps = sorted(m.p for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert ps == [0.1, 0.2, 0.2]
    replay = tmp_path / "c"
    result = run("rewrite", CNN, *SHAPE, "--recipe", str(second / "recipe.toml"), "--out", str(replay))
    assert result.exit_code == 0, result.output
    assert set(gt.load(replay).state_dict()) == set(model.state_dict())


def test_inspect_shows_region_tree_and_counts():
    result = run("inspect", f"{ROOT}/models/control_flow.py:DataDependent", "--input-shape", "2,3,16,16", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tree"]["kind"] == "opaque" and "not traceable" in summary["tree"]["reason"]
    assert summary["activations"] == {"ReLU": 2, "Tanh": 1}
    assert summary["norms"] == {"BatchNorm2d": 2}
    text = run("inspect", f"{ROOT}/models/control_flow.py:DataDependent", "--input-shape", "2,3,16,16")
    assert text.exit_code == 0 and "opaque" in text.output and "stem" in text.output


def test_model_args_and_factories(tmp_path):
    result = run("inspect", f"{ROOT}/models/plain_cnn.py:PlainCNN", *SHAPE, "--model-arg", "width=4", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["parameters"] < 2000
    result = run("inspect", f"{ROOT}/models/mlp.py:mlp_factory", "--input-shape", "4,32", "--model-arg", "depth=1", "--json")
    assert json.loads(result.stdout)["norms"] == {"BatchNorm1d": 1}


def test_weights_load_from_safetensors_and_weights_only_pt(tmp_path):
    from graphtricks.io.specs import load_model

    model = load_model(CNN)
    state = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    for weights in ("w.safetensors", "w.pt"):
        out = tmp_path / f"o_{weights}"
        result = run("rewrite", CNN, *SHAPE, "--weights", str(tmp_path / weights), "--dropout", "0.1", "--out", str(out))
        assert result.exit_code == 0, result.output
        assert torch.all(gt.load(out).state_dict()["head.weight"] == 0.5)


class _Evil:
    """Unpickling this writes a marker file: proof that code ran."""

    marker = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_pickled_model_is_never_unpickled_without_trust(tmp_path):
    evil = _Evil()
    evil.marker = str(tmp_path / "marker")
    (tmp_path / "model.pt").write_bytes(pickle.dumps(evil))
    result = run("rewrite", str(tmp_path / "model.pt"), *SHAPE, "--dropout", "0.1", "--out", str(tmp_path / "o"))
    assert result.exit_code == 1
    assert "--trust-pickle" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "marker").exists() and not (tmp_path / "o").exists()


def test_trusted_pickle_loads(tmp_path):
    from graphtricks.io.specs import load_model

    torch.save(load_model(CNN), tmp_path / "whole.pt")
    result = run("inspect", str(tmp_path / "whole.pt"), *SHAPE, "--trust-pickle", "--json")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["rewrite", f"{ROOT}/models/missing.py:X", *SHAPE, "--dry-run"], "does not exist"),
        (["rewrite", "no_such_module_xyz:Model", *SHAPE, "--dry-run"], "cannot import module"),
        (["rewrite", f"{ROOT}/models/plain_cnn.py:Nope", *SHAPE, "--dry-run"], "has no attribute 'Nope'"),
        (["rewrite", "plainspec", *SHAPE, "--dry-run"], "must be path/to/file.py:Name"),
        (["rewrite", CNN, "--input-shape", "4,5,32,32", "--dry-run"], "rejects inputs of shape 4,5,32,32"),
        (["rewrite", CNN, "--dry-run"], "--input-shape"),
        (["rewrite", CNN, *SHAPE, "--dropout", "0.1"], "--out"),
        (["rewrite", CNN, *SHAPE, "--model-arg", "width", "--dry-run"], "key=value"),
        (["rewrite", CNN, *SHAPE, "--model-arg", "depth=3", "--dry-run"], "cannot build"),
        (["inspect", "/nonexistent/folder/"], "does not exist"),
    ],
)
def test_bad_input_is_one_line(args, message):
    result = run(*args)
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_existing_output_folder_is_refused_without_force(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run("rewrite", CNN, *SHAPE, "--dropout", "0.1", "--out", str(out))
    assert result.exit_code == 1 and "--force" in result.output
    assert (out / "keep.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    result = run("rewrite", CNN, *SHAPE, "--dropout", "0.1", "--out", str(tmp_path / "file"))
    assert result.exit_code == 1 and "is a file" in result.output
    result = run("rewrite", CNN, *SHAPE, "--dropout", "0.1", "--out", str(out), "--force")
    assert result.exit_code == 0 and not (out / "keep.txt").exists()


def test_bad_recipe_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[passes]]\npass = 'dropout'\np = \n")
    result = run("rewrite", CNN, *SHAPE, "--recipe", str(bad), "--dry-run")
    assert result.exit_code == 1 and "not valid TOML" in result.output and "line 3" in result.output
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[[passes]]\npass = 'blur'\n")
    result = run("rewrite", CNN, *SHAPE, "--recipe", str(unknown), "--dry-run")
    assert result.exit_code == 1 and "unknown pass 'blur'" in result.output
    option = tmp_path / "option.toml"
    option.write_text("[[passes]]\npass = 'dropout'\nprobability = 0.3\n")
    result = run("rewrite", CNN, *SHAPE, "--recipe", str(option), "--dry-run")
    assert result.exit_code == 1 and "probability" in result.output


@pytest.mark.parametrize(
    "flag, value",
    [("--init", "glorot"), ("--shortcut", "diagonal"), ("--ln-over", "hw"), ("--dropout-kind", "spatial")],
)
def test_unknown_option_values_are_one_line_usage_errors(flag, value):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "graphtricks", "rewrite", CNN, *SHAPE, "--residual", "features.0", flag, value, "--dry-run"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and value in lines[0], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_python_dash_m_runs():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "graphtricks", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "rewrite" in done.stdout
