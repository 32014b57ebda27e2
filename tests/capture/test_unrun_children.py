"""Item 6 of issue 14: a child the example input never reaches is traced without inputs, and
passes edit it (or skip it with a note where they need shapes)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import graphtricks as gt


class Branch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Net(nn.Module):
    """``wide`` runs only for inputs wider than the example's."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.wide = Branch()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        if x.shape[0] > 100:  # data-dependent: the root stays opaque
            x = self.wide(x)
        return self.bn(self.proj(x))


def _rewrite(passes):
    torch.manual_seed(0)
    model = Net().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, gt.rewrite(model, passes, torch.randn(3, 4))


def test_an_unrun_child_is_traced():
    _, result = _rewrite([])
    region = {r.path: r for r in result.tree.regions()}["wide"]
    assert region.kind == "traced" and "not called on the example inputs" in region.reason


def test_dropout_goes_inside_the_unrun_child():
    model, result = _rewrite([gt.InsertDropout(p=0.1)])
    assert any(c.where.startswith("wide") for c in result.report.changes), [c.where for c in result.report.changes]
    rewritten = result.model.eval()
    x = torch.randn(128, 4)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), model(x))
    assert any(isinstance(m, nn.Dropout) for m in rewritten.wide.modules())
