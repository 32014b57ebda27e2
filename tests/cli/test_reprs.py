"""Issue 17, Python API: short reprs for the region tree, its regions, the report and the rewrite result."""

from __future__ import annotations

import torch
from torch import nn

import graphtricks as gt


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(20)])

    def forward(self, x):
        return self.body(x)


def test_reprs_are_a_few_lines_not_the_model():
    result = gt.rewrite(Net(), [gt.InsertDropout(p=0.1)], (torch.randn(2, 16),))
    text = repr(result)
    assert len(text.splitlines()) <= 5 and "Linear(in_features" not in text, text
    assert "InsertDropout(p=0.1" in text and "19 changes (dropout 19)" in text
    assert repr(result.tree) == "RegionTree(Net: 1 traced / 0 opaque regions, traced 100%)"
    assert str(result.tree) == repr(result.tree)  # print(result.tree) is the same line
    root = repr(result.tree.root)
    assert root.startswith("Region('<root>', traced, Net, nodes=") and "\n" not in root
    assert repr(result.report).startswith("Report(19 changes (dropout 19), 1 warning, traced 100%")
