"""Item 5 of issue 14: a module registered under several names is captured once, edited once,
and stays shared (the same parameters under every name)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import graphtricks as gt


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.pe = nn.Sequential(nn.Linear(4, 4), nn.GELU())
        self.blocks = nn.ModuleList([nn.Linear(4, 4), self.pe])  # the same module, a second name
        self.norm = nn.BatchNorm1d(4)
        self.again = nn.Module()
        self.again.norm = self.norm
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.norm(self.blocks[0](self.pe(x))))


def _groups(model):
    """Names that share one parameter, as sets (one set per shared tensor)."""
    by_id: dict[int, set] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), set()).add(name)
    return sorted(sorted(names) for names in by_id.values())


def _rewrite(model, passes, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gt.rewrite(model, passes, x)


@pytest.mark.parametrize("passes", [[], [gt.InsertDropout(p=0.1)], [gt.BatchNormToLayerNorm()]],
                         ids=["none", "dropout", "bn_to_ln"])
def test_a_module_under_two_names_stays_shared(passes):
    torch.manual_seed(0)
    model = Shared().eval()
    x = torch.randn(3, 4)
    result = _rewrite(model, passes, x)
    rewritten = result.model.eval()
    want = _groups(model)
    got = _groups(rewritten)
    for names in want:  # every name that shared a parameter still does (new parameters aside)
        assert any(set(names) <= set(g) for g in got), (names, got)
    if not passes:
        torch.testing.assert_close(rewritten(x), model(x))
    if passes and passes[0].name == "bn_to_ln":
        assert len(result.report.changes) == 1  # edited once
        assert not any("running_mean" in k for k in rewritten.state_dict())  # under no name is the old one left


def test_coat_lite_tiny_captures():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("coat_lite_tiny", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    result = _rewrite(model, [gt.InsertDropout(p=0.1)], x)
    assert result.report.changes
    got = _groups(result.model)
    assert any("serial_blocks1.0.cpe.proj.weight" in g and "cpe1.proj.weight" in g for g in got), got[:3]
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x))
