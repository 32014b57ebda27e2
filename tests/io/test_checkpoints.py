"""An original checkpoint loads into a rewritten model (issue 15.1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphtricks as gt


class ConvBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stages = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)
        self.bn_head = nn.BatchNorm1d(4)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.bn_head(self.head(x.mean((2, 3))))


def _trained(model):
    """Give every tensor a value a fresh model would not have."""
    torch.manual_seed(3)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t).abs() + 0.5)
    return model


def _stats(sd):
    return sorted(k for k in sd if k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked"))


def test_plain_batch_norm_checkpoint_lands_and_statistics_are_named():
    original = _trained(ConvBn()).eval()
    result = gt.rewrite(original, [gt.BatchNormToLayerNorm()], (torch.randn(2, 3, 8, 8),))
    sd = original.state_dict()
    fresh = gt.rewrite(ConvBn(), [gt.BatchNormToLayerNorm()], (torch.randn(2, 3, 8, 8),)).model
    out = fresh.load_state_dict(sd, strict=False)
    assert out.missing_keys == []
    assert sorted(out.unexpected_keys) == _stats(sd)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, sd[key]), key
    mapped, leftovers = gt.map_state_dict(result, sd)
    assert sorted(leftovers) == _stats(sd)
    assert all(why.startswith("dropped by bn_to_ln") for why in leftovers.values())
    assert set(mapped) == set(result.model.state_dict())


def test_residual_and_bn_to_ln_together():
    original = _trained(ConvBn()).eval()
    passes = [gt.AddResidual(blocks=["stages"]), gt.BatchNormToLayerNorm()]
    result = gt.rewrite(ConvBn(), passes, (torch.randn(2, 3, 8, 8),))
    sd = original.state_dict()
    mapped, leftovers = gt.map_state_dict(result, sd)
    assert sorted(leftovers) == _stats(sd)
    out = result.model.load_state_dict(sd, strict=False)
    assert sorted(out.unexpected_keys) == _stats(sd)
    own = result.model.state_dict()
    assert all(not k.startswith("stages.") or k.startswith("stages.body.") or "shortcut" in k or "gate" in k for k in own)
    for key in mapped:
        assert torch.equal(own[key], mapped[key]), key


def test_timm_batch_norm_act_keys_move_to_norm():
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = BatchNormAct2d(8, act_layer=nn.SiLU)

        def forward(self, x):
            return self.bn1(self.conv(x))

    del timm
    original = _trained(Net()).eval()
    result = gt.rewrite(Net(), [gt.BatchNormToLayerNorm()], (torch.randn(2, 3, 8, 8),))
    model = result.model
    assert "bn1.norm.weight" in model.state_dict()
    sd = original.state_dict()
    out = model.load_state_dict(sd, strict=False)
    assert out.missing_keys == []
    assert sorted(out.unexpected_keys) == _stats(sd)
    assert torch.equal(model.state_dict()["bn1.norm.weight"], sd["bn1.weight"])
    assert torch.equal(model.state_dict()["bn1.norm.bias"], sd["bn1.bias"])
    mapped, leftovers = gt.map_state_dict(model, sd)
    assert sorted(leftovers) == _stats(sd)
    assert torch.equal(mapped["bn1.norm.weight"], sd["bn1.weight"])
