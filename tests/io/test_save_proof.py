"""Issue 23, item 7: ``gt.save`` proves its source before it writes anything.

The source must build the model the rewrite was given (structure and parameter shapes); a
source that does not build, or builds another model, is one line naming the first difference,
and nothing is written.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import graphtricks as gt
from graphtricks.errors import SpecError
from graphtricks.io import folder as saving

HERE = Path(__file__).resolve()


class Net(nn.Module):
    """A small classifier."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.body(x))


class Deeper(Net):
    """Net with one more layer: same parameter names up to the head, one module more."""

    def __init__(self):
        super().__init__()
        self.body.append(nn.Tanh())


def _rewrite(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gt.rewrite(model.eval(), [gt.InsertDropout(0.1)], torch.randn(2, 4))


def test_a_source_that_builds_the_model_is_saved_and_loads(tmp_path):
    result = _rewrite(Net(classes=5))
    folder = gt.save(result, tmp_path / "out", {"spec": f"{HERE}:Net", "model_args": {"classes": 5}})
    assert torch.equal(gt.load(folder).eval()(torch.ones(1, 4)), result.model.eval()(torch.ones(1, 4)))


@pytest.mark.parametrize("source, words", [
    ({"spec": f"{HERE}:Net"}, "head.weight has shape [3, 8] in the rebuilt model, [5, 8] in the one rewritten"),
    ({"spec": f"{HERE.parent / 'gone.py'}:Net"}, "its source does not build: model file"),
    ({"spec": f"{HERE}:Nope"}, "its source does not build"),
    ({"spec": f"{HERE}:Deeper", "model_args": {}}, "module body.2 is in the rebuilt model only"),
    ({}, "give source={'spec': ...}"),
])
def test_a_source_that_does_not_build_the_model_is_one_line_and_nothing_is_written(tmp_path, source, words):
    result = _rewrite(Net(classes=5))
    out = tmp_path / "out"
    with pytest.raises(SpecError) as info:
        gt.save(result, out, source)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_torchvision_resnet18_without_its_num_classes_is_refused(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = gt.rewrite(torchvision.models.resnet18(num_classes=10).eval(), [gt.InsertDropout(0.1)],
                            torch.randn(1, 3, 32, 32))
    with pytest.raises(SpecError, match=r"fc.weight has shape \[1000, 512\] in the rebuilt model, \[10, 512\]"):
        gt.save(result, tmp_path / "out", {"spec": "tv:resnet18"})
    assert not (tmp_path / "out").exists()
    gt.save(result, tmp_path / "out", {"spec": "tv:resnet18", "model_args": {"num_classes": 10}})
    assert (tmp_path / "out" / "recipe.toml").is_file()


def test_a_model_rewritten_twice_in_memory_is_not_what_its_source_builds(tmp_path):
    once = _rewrite(Net())
    twice = _rewrite(once.model)
    with pytest.raises(SpecError, match="builds another model"):
        gt.save(twice, tmp_path / "out", {"spec": f"{HERE}:Net"})


def test_large_models_are_rebuilt_on_the_meta_device(tmp_path, monkeypatch):
    result = _rewrite(Net(classes=5))
    monkeypatch.setattr(saving, "PROOF_ON_META_BYTES", 0)
    built_on, load_model = [], saving.load_model

    def recording(*args, **kwargs):
        model = load_model(*args, **kwargs)
        built_on.append(model.head.weight.device.type)
        return model

    monkeypatch.setattr(saving, "load_model", recording)
    with pytest.raises(SpecError, match="head.weight has shape"):
        gt.save(result, tmp_path / "a", {"spec": f"{HERE}:Net"})
    gt.save(result, tmp_path / "b", {"spec": f"{HERE}:Net", "model_args": {"classes": 5}})
    assert built_on == ["meta", "meta"]
    assert gt.load(tmp_path / "b").head.weight.device.type == "cpu"
