"""Issue 23, items 4 and 10: selections are never silent; rewrite and its twins take what users give.

A string where a list of patterns is expected is one pattern, for every pass option that takes
patterns; a pattern that matches no name of the model is an error naming it and the closest
names (a warning for a pass built with ``strict=False``), in Python, in a recipe and on the
command line alike.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import graphtricks as gt
from graphtricks.cli import app
from graphtricks.errors import GraphtricksError, PassError, SelectionError
from graphtricks.passes import PASSES, SelectionWarning
from graphtricks.passes.base import pass_from_config
from models.plain_cnn import PlainCNN
from models.plain_vgg import PlainVGG
from tests.conftest import ROOT
from tests.keyword_models import KwOnly, Mixed

X = torch.randn(2, 3, 32, 32)
# the options of each registered pass that a pass needs to run at all
NEEDED = {"residual": {"blocks": ["stages.1"]}}


def _rewrite(model, passes, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gt.NoChangeWarning)
        warnings.simplefilter("ignore", gt.PassNoteWarning)
        return gt.rewrite(model, passes, *args, **kwargs)


# -- a string is one pattern -----------------------------------------------------------------
def test_a_string_include_is_one_glob_not_its_characters():
    result = _rewrite(PlainVGG().eval(), [gt.InsertDropout(0.1, include="stages.1.*")], X)
    where = [c.where for c in result.report.changes]
    assert where and all(w.startswith("stages.1.") for w in where)
    assert gt.InsertDropout(0.1, include="stages.1.*").include == ("stages.1.*",)


def test_bn_to_ln_exclude_given_as_a_string_keeps_that_batchnorm():
    model = PlainCNN().eval()
    result = _rewrite(model, [gt.BatchNormToLayerNorm(exclude="features.1")], X)
    assert isinstance(result.model.features[1], nn.BatchNorm2d)
    assert "features.1" not in [c.where for c in result.report.changes]
    assert not isinstance(result.model.features[4], nn.BatchNorm2d)


def test_resnet18_selections_from_the_issue():
    torchvision = pytest.importorskip("torchvision")
    model, x = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(2, 3, 64, 64)
    dropout = _rewrite(model, [gt.InsertDropout(0.1, include="layer1.*")], x)
    assert len(dropout.report.changes) == 4 and all(c.where.startswith("layer1.") for c in dropout.report.changes)
    swapped = _rewrite(model, [gt.BatchNormToLayerNorm(exclude="bn1")], x)
    assert isinstance(swapped.model.bn1, nn.BatchNorm2d)
    assert "bn1" not in [c.where for c in swapped.report.changes]


@pytest.mark.parametrize("make, value", [
    (lambda v: gt.InsertDropout(0.1, activations=v), "ReLU"),
    (lambda v: gt.Initialize(types=v), "conv2d"),
    (lambda v: gt.AddResidual(v), "stages.*"),
    (lambda v: gt.AddResidual(spans=v), "a:b"),
])
def test_every_list_option_takes_one_string_as_one_item(make, value):
    made = make(value)
    assert any(len(v) == 1 for v in (getattr(made, k, ()) for k in ("activations", "types", "blocks", "spans")))


@pytest.mark.parametrize("bad", [3, [None], [""], b"x", {"a": 1}, ["a", 2]])
def test_selections_that_are_not_strings_are_refused_in_one_line(bad):
    for name, cls in PASSES.items():
        with pytest.raises(PassError, match="string") as info:
            cls(**{**NEEDED.get(name, {}), "include": bad})
        assert "\n" not in str(info.value)


# -- a pattern that matches nothing -------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PASSES))
@pytest.mark.parametrize("option", ["include", "exclude"])
def test_a_pattern_that_matches_nothing_is_an_error_naming_the_closest_names(name, option):
    p = PASSES[name](**NEEDED.get(name, {}), **{option: ["stages.1.*", "stage.0"]})
    with pytest.raises(SelectionError, match=rf"^{name}: {option} pattern 'stage.0' matches nothing") as info:
        _rewrite(PlainVGG().eval(), [p], X)
    assert "'stages.0'" in str(info.value) and "\n" not in str(info.value)
    assert (info.value.option, info.value.pattern) == (option, "stage.0")


@pytest.mark.parametrize("name", sorted(PASSES))
def test_strict_false_makes_it_a_named_warning_and_the_pass_runs(name):
    p = PASSES[name](**NEEDED.get(name, {}), exclude=["nomatch"], strict=False)
    with pytest.warns(SelectionWarning, match="exclude pattern 'nomatch' matches nothing"):
        result = gt.rewrite(PlainVGG().eval(), [p], X)
    assert any("'nomatch'" in w for w in result.report.warnings)
    assert pass_from_config(p.config()).strict is False and p.config()["strict"] is False


def test_residual_block_patterns_are_checked_like_include():
    with pytest.raises(SelectionError, match="blocks pattern 'stage.\\*'.*'stages"):
        _rewrite(PlainVGG().eval(), [gt.AddResidual("stage.*")], X)


def test_a_later_pass_may_select_what_an_earlier_pass_built():
    passes = [gt.AddResidual("stages.1"), gt.InsertDropout(0.1, include="stages.1.body.*")]
    result = _rewrite(PlainVGG().eval(), passes, X)
    dropouts = [c.where for c in result.report.changes if c.pass_name == "dropout"]
    assert dropouts and all(w.startswith("stages.1.body.") for w in dropouts)


def test_a_recipe_pattern_that_matches_nothing_is_an_error(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[passes]]\npass = "dropout"\np = 0.1\nexclude = ["feature.2"]\n')
    result = CliRunner().invoke(app, ["rewrite", f"{ROOT}/models/plain_cnn.py:PlainCNN", "--input-shape", "2,3,32,32",
                                      "--recipe", str(recipe), "--dry-run"])
    assert result.exit_code == 1
    assert "dropout: exclude pattern 'feature.2' matches nothing" in result.output and "'features.2'" in result.output


@pytest.mark.parametrize("flag", ["--exclude", "--include"])
def test_cli_selection_that_matches_nothing_exits_1_with_one_line(flag, tmp_path):
    out = tmp_path / "cnn"
    result = CliRunner().invoke(app, ["rewrite", f"{ROOT}/models/plain_cnn.py:PlainCNN", "--input-shape", "2,3,32,32",
                                      "--dropout", "0.1", flag, "nomatch", "--out", str(out)])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {flag} 'nomatch' matches nothing in this model (graphtricks inspect lists the model's names)"]
    assert not out.exists()


# -- item 10: one pass or a list, modules only, keyword inputs in the functional twins ---------
def test_rewrite_takes_one_pass_or_a_list():
    one = _rewrite(PlainCNN().eval(), gt.InsertDropout(0.1), X)
    listed = _rewrite(PlainCNN().eval(), [gt.InsertDropout(0.1)], X)
    assert [c.where for c in one.report.changes] == [c.where for c in listed.report.changes] != []


@pytest.mark.parametrize("model, words", [
    (lambda x: x, "got function"), (None, "got NoneType None"), (PlainCNN, "call it to build the model first"),
    (torch.randn(2), "got Tensor"),
])
def test_a_model_that_is_no_module_is_one_line(model, words):
    with pytest.raises(GraphtricksError, match="rewrite takes a torch.nn.Module") as info:
        gt.rewrite(model, [gt.InsertDropout(0.1)], X)
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("passes, words", [
    ([gt.InsertDropout(0.1), "dropout"], "passes[1] is not a graphtricks pass but str 'dropout'"),
    ("dropout", "got str 'dropout'"), (None, "got NoneType None"), (gt.InsertDropout, "give an instance"),
    ([gt.InsertDropout], "passes[0] is not a graphtricks pass"),
])
def test_something_that_is_no_pass_is_one_line(passes, words):
    with pytest.raises(PassError, match="pass") as info:
        gt.rewrite(PlainCNN().eval(), passes, X)
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("twin, kwargs", [
    (gt.insert_dropout, {"p": 0.1}), (gt.bn_to_ln, {}), (gt.initialize, {"scheme": "auto"}),
    (gt.add_residual, {"blocks": ["fc2"]}),
])
def test_functional_twins_take_keyword_inputs(twin, kwargs):
    model = KwOnly().eval()
    inputs = {"x": torch.randn(4, 8), "mask": torch.ones(4, 16)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = twin(model, **kwargs, example_kwargs=inputs)
    assert result.example_kwargs.keys() == inputs.keys() and result.report.changes
    assert result.model(**inputs).shape == (4, 4)


def test_functional_twins_take_positional_and_keyword_inputs_together():
    model, x = Mixed().eval(), torch.randn(3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = gt.initialize(model, (x,), "auto", example_kwargs={"scale": torch.full((3, 4), 2.0)})
    assert result.example_kwargs["scale"].shape == (3, 4) and result.report.changes


def test_cli_pattern_given_to_every_pass_may_name_what_one_of_them_builds():
    # --exclude goes to the residual pass too, before it has built stages.1.relu (the activation after the sum)
    result = CliRunner().invoke(app, ["rewrite", f"{ROOT}/models/plain_vgg.py:PlainVGG", "--input-shape", "2,3,32,32",
                                      "--residual", "stages.1", "--post-act", "relu", "--dropout", "0.1",
                                      "--exclude", "stages.1.relu", "--dry-run", "--json"], terminal_width=200)
    assert result.exit_code == 0, result.output
    where = [c["where"] for c in json.loads(result.stdout)["report"]["changes"]]
    assert "stages.1" in where and "stages.1.body.2" in where and "stages.1.relu" not in where
