"""Save/load keeps what the user set (issue 15.2): frozen flags, modes, metadata, non-persistent buffers."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import graphtricks as gt
from graphtricks.errors import SavedModelError

SPEC = f"{__file__}:Net"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 4)
        self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)
        self.extra = nn.Module()
        self.extra.register_buffer("table", torch.arange(3.0), persistent=False)  # never used

    def forward(self, x):
        return self.head(self.backbone(x).mean((2, 3))) * self.scale


def _save_and_load(model, tmp_path, spec=SPEC, shape=(2, 3, 8, 8)):
    x = torch.randn(*shape)
    result = gt.rewrite(model, [gt.InsertDropout(p=0.1)], (x,))
    out = gt.save(result, tmp_path / "out", {"spec": spec, "input_shapes": [list(shape)]})
    return result, gt.load(out), out


def test_frozen_flags_modes_and_non_persistent_buffers_survive(tmp_path):
    model = Net()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    model.eval()
    model.head.train()
    result, loaded, out = _save_and_load(model, tmp_path)
    frozen = sorted(n for n, p in result.model.named_parameters() if not p.requires_grad)
    assert frozen and sorted(n for n, p in loaded.named_parameters() if not p.requires_grad) == frozen
    assert not loaded.training and loaded.head.training
    assert {n: m.training for n, m in loaded.named_modules()} == {n: m.training for n, m in result.model.named_modules()}
    assert "scale" not in loaded.state_dict() and "extra.table" not in loaded.state_dict()
    assert torch.equal(loaded.scale, torch.full((4,), 2.0)) and torch.equal(loaded.extra.table, torch.arange(3.0))
    user = json.loads((out / "structure.json").read_text())["user"]
    assert sorted(user["frozen"]) == frozen and user["non_persistent"] == ["extra.table", "scale"]


def test_rewrite_keeps_non_persistent_buffers_out_of_the_state_dict():
    result = gt.rewrite(Net(), [gt.InsertDropout(p=0.1)], (torch.randn(2, 3, 8, 8),))
    assert set(result.model.state_dict()) == set(Net().state_dict())
    assert {n for n, _ in result.model.named_buffers()} >= {"scale", "extra.table"}


def test_a_frozen_parameter_the_rebuild_lacks_is_an_error(tmp_path):
    result, _, out = _save_and_load(Net(), tmp_path)
    path = out / "structure.json"
    structure = json.loads(path.read_text())
    structure["user"]["frozen"] = ["backbone.9.weight"]
    path.write_text(json.dumps(structure))
    with pytest.raises(SavedModelError, match="backbone.9.weight"):
        gt.load(out)


def test_mnasnet_metadata_version_survives(tmp_path):
    pytest.importorskip("torchvision")
    model = gt.load_model("tv:mnasnet0_5").eval()
    result, loaded, out = _save_and_load(model, tmp_path, "tv:mnasnet0_5", (1, 3, 64, 64))
    assert json.loads((out / "structure.json").read_text())["user"]["metadata"]
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded.eval()(x), result.model.eval()(x))


class Versioned(nn.Module):
    """Reads the state-dict version as MNASNet does; data-dependent, so it stays opaque."""

    _version = 3

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > -1e9 else x

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if local_metadata.get("version") != 3:
            raise ValueError(f"version should be 3 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


class WithVersioned(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Versioned()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.inner(x)) if x.sum() > -1e9 else x


def test_a_layer_that_reads_its_version_loads(tmp_path):
    result, loaded, out = _save_and_load(WithVersioned(), tmp_path, f"{__file__}:WithVersioned", (2, 4))
    assert json.loads((out / "structure.json").read_text())["user"]["metadata"]["inner"]["version"] == 3
    assert type(loaded.inner).__name__ == "Versioned"
    x = torch.randn(2, 4)
    assert torch.equal(loaded.eval()(x), result.model.eval()(x))
