"""Issue 17, suggestions: unknown model names, recipe keys and pass names get the closest valid ones in one line."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import graphtricks as gt
from graphtricks.cli import app
from graphtricks.errors import OutputError
from tests.conftest import ROOT

runner = CliRunner()
CNN = f"{ROOT}/models/plain_cnn.py:PlainCNN"


def run(*args: str):
    return runner.invoke(app, list(args), terminal_width=300)


@pytest.mark.parametrize(
    "spec, package, near",
    [("tv:resnet19", "torchvision", "tv:resnet18"), ("timm:resnet-18", "timm", "timm:resnet18"), ("hf:bertt", "transformers", "hf:bert"),
     ("timm:efficientnet_bo", "timm", "timm:efficientnet_b0")],
)
def test_unknown_zoo_names_suggest_the_closest(spec, package, near):
    pytest.importorskip(package)
    result = run("inspect", spec, "--input-shape", "1,3,32,32")
    assert result.exit_code == 1, result.output
    assert f"did you mean {near}" in result.output  # the closest first
    assert len(result.output.strip().splitlines()) == 1 and len(result.output) < 300


@pytest.mark.parametrize(
    "entry, message",
    [
        ('pass = "dropout"\nprob = 0.1', "has no option 'prob'; did you mean 'p'? (options: p, kind"),
        ('pass = "dropuot"\np = 0.1', "unknown pass 'dropuot'; did you mean 'dropout'?"),
    ],
)
def test_recipe_typos_suggest_the_closest(tmp_path, entry, message):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"[[passes]]\n{entry}\n")
    result = run("rewrite", CNN, "--input-shape", "2,3,32,32", "--recipe", str(recipe), "--dry-run")
    assert result.exit_code == 1, result.output
    assert message in result.output


def test_validate_of_a_missing_folder_says_it_does_not_exist():
    result = run("validate", "/no/such/path")
    assert result.exit_code == 1, result.output
    assert "does not exist" in result.output


def test_save_errors_speak_python_and_the_cli_speaks_flags(tmp_path):
    from graphtricks.io.specs import load_model
    import torch

    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = gt.rewrite(load_model(CNN), [], (torch.randn(2, 3, 32, 32),))
    with pytest.raises(OutputError) as e:
        gt.save(result, out, {"spec": CNN})
    assert "force=True" in str(e.value) and "--" not in str(e.value)
    cli = run("rewrite", CNN, "--input-shape", "2,3,32,32", "--dropout", "0.1", "--out", str(out))
    assert cli.exit_code == 1 and "--force" in cli.output and "--out" in cli.output


def test_suggestions_rank_by_edits_within_the_family():
    from graphtricks.suggest import closest

    family = [f"efficientnet_b{i}" for i in range(9)] + ["efficientnet_lite0", "tf_efficientnet_b0", "efficientvit_b0"]
    assert closest("efficientnet_bo", family)[0] == "efficientnet_b0"  # o for 0: half an edit
    assert closest("efficientnet_b", family)[0] == "efficientnet_b0"
    vits = ["samvit_base_patch16", "vit_base_patch16_224", "vit_base_patch16_384"]
    assert closest("vit_base_patch16", vits)[:2] == ["vit_base_patch16_224", "vit_base_patch16_384"]
    assert closest("resnet19", ["resnet18", "resnet101", "regnet_y_16gf"])[0] == "resnet18"
    assert closest("zzzz", family) == []
