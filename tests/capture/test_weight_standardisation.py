"""Item 4 of issue 14: BN→LN swaps only normalisations of activations; a batch_norm of a weight
(weight standardisation) is left alone and named in the report."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphtricks as gt


class StdConv(nn.Conv2d):
    """timm's StdConv2d: the weight is standardised with a functional batch_norm in forward."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = StdConv(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        x = F.relu(self.conv(x))
        return F.batch_norm(x, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias)


def _rewrite(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gt.rewrite(model, [gt.BatchNormToLayerNorm()], x)


def test_weight_standardisation_is_left_alone_and_noted():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    result = _rewrite(model, x)
    assert len(result.report.changes) == 1, [c.where for c in result.report.changes]
    assert any("conv" in w and "weight standardisation" in w for w in result.report.warnings)
    gm = result.tree.root.graph_module
    left = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.batch_norm]
    assert len(left) == 1 and "conv" in str(left[0].meta.get("nn_module_stack", {}))


def test_nf_regnet_keeps_its_scaled_std_convs():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("nf_regnet_b0", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    result = _rewrite(model, x)
    assert not result.report.changes, [c.where for c in result.report.changes][:5]
    assert sum("weight standardisation" in w for w in result.report.warnings) > 40
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x))
