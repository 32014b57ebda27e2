"""Item 3 of issue 14: hooks registered before a rewrite keep firing once per call, on the same
module or on the module that replaced it, and never during the rewrite itself."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from torch import nn

import graphtricks as gt


def _torchvision():
    """torchvision, or a skip where the `zoo` extra is not installed."""
    return pytest.importorskip("torchvision")


def _hooked_resnet(counts: Counter):
    torch.manual_seed(0)
    model = _torchvision().models.resnet18(weights=None).eval()

    def count(name):
        def hook(*_):
            counts[name] += 1
        return hook

    model.register_forward_hook(count("root"))
    model.register_forward_pre_hook(count("root.pre"))
    model.layer1.register_forward_hook(count("layer1"))
    model.layer1[0].register_forward_hook(count("layer1.0"), with_kwargs=True)
    model.layer1[0].register_full_backward_hook(count("layer1.0.backward"))
    model.layer2[0].bn1.register_forward_hook(count("layer2.0.bn1"))
    model.layer3[1].register_forward_pre_hook(count("layer3.1.pre"))
    return model


PASSES = {
    "none": lambda: [],
    "dropout": lambda: [gt.InsertDropout(p=0.1)],
    "bn_to_ln": lambda: [gt.BatchNormToLayerNorm()],
    "init": lambda: [gt.Initialize()],
    "residual": lambda: [gt.AddResidual(blocks=["layer3.1"])],
}


@pytest.mark.parametrize("name", sorted(PASSES))
def test_hooks_fire_as_often_as_in_the_original(name):
    counts: Counter = Counter()
    model = _hooked_resnet(counts)
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = gt.rewrite(model, PASSES[name](), x)
    assert not counts, f"the user's hooks ran during the rewrite: {dict(counts)}"
    model(x).sum().backward()
    want = Counter(counts)
    counts.clear()
    result.model.eval()
    result.model(x).sum().backward()
    assert counts == want
    assert all(v == 1 for v in want.values()) and len(want) == 7


def test_moved_hooks_are_noted():
    counts: Counter = Counter()
    model = _hooked_resnet(counts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = gt.rewrite(model, [gt.BatchNormToLayerNorm(), gt.AddResidual(blocks=["layer3.1"])],
                            torch.randn(2, 3, 64, 64))
    text = " ".join(result.report.warnings)
    assert "layer2.0.bn1" in text and "hooks" in text
    assert "layer3.1" in text


def test_a_hooked_module_stays_a_called_module():
    counts: Counter = Counter()
    result = gt.rewrite(_hooked_resnet(counts), [], torch.randn(2, 3, 64, 64))
    code = result.tree.root.graph_module.code
    assert "self.layer1(" in code and "self.layer3" in code
    paths = {r.path: r for r in result.tree.regions()}
    assert paths["layer1"].kind == "opaque" and "hooks" in paths["layer1"].reason
    assert paths["layer1.0"].kind == "traced" and paths["layer3.1"].kind == "traced"
