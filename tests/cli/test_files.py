"""Issue 17, files: recipe paths relative to the saved folder, one file mode for everything written."""

from __future__ import annotations

import os
import shutil
import stat
import tomllib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import graphtricks as gt
from graphtricks.cli import app
from tests.conftest import ROOT

runner = CliRunner()


@pytest.fixture()
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def test_every_written_file_and_folder_gets_the_umask_mode(tmp_path, umask_027):
    out = tmp_path / "cnn"
    result = runner.invoke(app, ["rewrite", f"{ROOT}/models/plain_cnn.py:PlainCNN", "--input-shape", "2,3,32,32",
                                 "--dropout", "0.1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    gt.export(out)
    modes = _modes(out)
    assert {"model.safetensors", "recipe.toml", "model.train.onnx", "model.infer.onnx"} <= set(modes)
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o750 if (out / name).is_dir() else 0o640)}
    assert not wrong, wrong


def test_recipe_names_the_model_file_relative_to_the_folder(tmp_path):
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    shutil.copy(ROOT / "models" / "plain_cnn.py", project / "models" / "plain_cnn.py")
    (project / "out").mkdir()
    result = runner.invoke(app, ["rewrite", f"{project}/models/plain_cnn.py:PlainCNN", "--input-shape", "2,3,32,32",
                                 "--dropout", "0.1", "--out", str(project / "out" / "cnn")])
    assert result.exit_code == 0, result.output
    source = tomllib.loads((project / "out" / "cnn" / "recipe.toml").read_text())["source"]
    assert source["spec"] == "../../models/plain_cnn.py:PlainCNN"
    # the project moves as a whole, and is read from elsewhere: the recipe still finds the file
    moved = tmp_path / "moved"
    project.rename(moved)
    (moved / "models" / "source").mkdir()  # not the copy beside the weights: the original is found
    model = gt.load(moved / "out" / "cnn")
    assert model(torch.randn(2, 3, 32, 32)).shape[0] == 2
    chained = runner.invoke(app, ["rewrite", str(moved / "out" / "cnn"), "--init", "auto", "--out",
                                  str(moved / "out" / "cnn2")])
    assert chained.exit_code == 0, chained.output
    again = tomllib.loads((moved / "out" / "cnn2" / "recipe.toml").read_text())["source"]
    assert again["spec"] == "../../models/plain_cnn.py:PlainCNN"


def test_folders_written_with_absolute_paths_still_load(tmp_path):
    shutil.copy(ROOT / "models" / "plain_cnn.py", tmp_path / "plain_cnn.py")
    out = tmp_path / "cnn"
    result = runner.invoke(app, ["rewrite", f"{tmp_path}/plain_cnn.py:PlainCNN", "--input-shape", "2,3,32,32",
                                 "--dropout", "0.1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    recipe = out / "recipe.toml"
    text = recipe.read_text()
    relative = tomllib.loads(text)["source"]["spec"]
    assert relative == "../plain_cnn.py:PlainCNN"
    recipe.write_text(text.replace(relative, f"{tmp_path}/plain_cnn.py:PlainCNN"))
    shutil.rmtree(out / "source")  # the recorded path is the one read
    assert gt.load(out)(torch.randn(2, 3, 32, 32)).shape[0] == 2
