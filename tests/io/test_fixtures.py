"""Issue 23, item 8: a folder saved by each release loads with this one and computes the same.

The folders are in ``tests/fixtures`` (its README says how each was made). The first release's
recipe has no ``gates`` option, and that release inserted dropout after gates: loaded now, its
dropout still goes there, where a recipe of a later release skips gates.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

import graphtricks as gt
from graphtricks.cli import app
from graphtricks.errors import RecipeError
from graphtricks.io.folder import load_saved
from graphtricks.io.recipe import FORMAT, Recipe, dumps_toml, read_recipe

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
# format -> dropout sites of the fixture, as its release saved them
SITES = {0: ["relu", "relu_1", "sigmoid", "relu_2"], 1: ["relu", "relu_1", "relu_2"], 2: ["relu", "relu_1", "relu_2"]}


def _dropouts(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Dropout) for m in model.modules())


def test_there_is_a_fixture_for_every_format():
    assert sorted(int(p.name.removeprefix("format")) for p in FIXTURES.glob("format*") if p.is_dir()) == list(range(FORMAT + 1))


@pytest.mark.parametrize("version", sorted(SITES))
def test_a_folder_of_each_release_loads_and_computes_the_same(version):
    folder = FIXTURES / f"format{version}"
    saved = json.loads((folder / "report.json").read_text())
    assert [c["where"] for c in saved["changes"]] == SITES[version]  # what that release did
    model = gt.load(folder).eval()
    assert _dropouts(model) == len(SITES[version])
    expected = load_file(str(FIXTURES / f"format{version}.expected.safetensors"))
    with torch.no_grad():
        out = model(expected["input"])
    torch.testing.assert_close(out, expected["output"], rtol=1e-5, atol=1e-6)
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(expected["input"]), model(expected["input"]))  # dropout is on in train mode


@pytest.mark.parametrize("version, gates, constants", [(0, True, True), (1, False, True), (2, False, False)])
def test_each_release_s_recipe_is_read_as_that_release_meant_it(version, gates, constants):
    # the first two releases also put dropout after activations of parameters alone (``constants``)
    recipe = load_saved(FIXTURES / f"format{version}").recipe
    assert recipe.format == FORMAT
    assert recipe.passes[0].get("gates", False) is gates
    assert recipe.build_passes()[0].gates is gates
    assert recipe.build_passes()[0].constants is constants


def test_a_recipe_file_without_format_is_the_current_format(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[[passes]]\npass = "dropout"\np = 0.1\n')
    assert read_recipe(path).format == FORMAT and read_recipe(path).build_passes()[0].gates is False
    assert read_recipe(path, unversioned=0).build_passes()[0].gates is True
    assert read_recipe(path, unversioned=1).build_passes()[0].strict is False


def test_format_is_written_and_read_back(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(dumps_toml(Recipe(passes=[{"pass": "dropout", "p": 0.1}])))
    assert f"format = {FORMAT}" in path.read_text() and read_recipe(path).format == FORMAT


@pytest.mark.parametrize("value, words", [(FORMAT + 1, "newer graphtricks"), ('"two"', "whole number"), (-1, "whole number")])
def test_a_format_this_release_cannot_read_is_one_line(tmp_path, value, words):
    path = tmp_path / "r.toml"
    path.write_text(f'format = {value}\n[[passes]]\npass = "dropout"\np = 0.1\n')
    with pytest.raises(RecipeError, match=words) as info:
        read_recipe(path)
    assert "\n" not in str(info.value)


def test_a_first_release_folder_rewritten_again_keeps_its_dropout_after_gates(tmp_path):
    folder = tmp_path / "format0"
    shutil.copytree(FIXTURES / "format0", folder)  # elsewhere: the source is found in the folder alone
    result = CliRunner().invoke(app, ["rewrite", str(folder), "--bn-to-ln", "--out", str(tmp_path / "chain")])
    assert result.exit_code == 0, result.output
    recipe = (tmp_path / "chain" / "recipe.toml").read_text()
    assert f"format = {FORMAT}" in recipe and "gates = true" in recipe
    chained = gt.load(tmp_path / "chain")
    assert _dropouts(chained) == len(SITES[0]) and not any(isinstance(m, nn.BatchNorm2d) for m in chained.modules())
