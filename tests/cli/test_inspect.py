"""Issue 17, inspect: candidate blocks apart from single layers, blocks that already add their input back."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import graphtricks as gt
from graphtricks.cli import app
from graphtricks.passes import candidate_blocks

runner = CliRunner()

SOURCE = '''
import torch
from torch import nn


class Basic(nn.Module):
    """A ResNet basic block: its forward adds its input back."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += x
        return torch.relu(out)


class Plain(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layers = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), Basic(), Plain(), Basic())

    def forward(self, x):
        return self.layers(self.stem(x))
'''


@pytest.fixture()
def spec(tmp_path):
    (tmp_path / "net.py").write_text(SOURCE)
    return f"{tmp_path / 'net.py'}:Net"


def _inspect_json(spec: str) -> dict:
    result = runner.invoke(app, ["inspect", spec, "--input-shape", "2,3,8,8", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_blocks_are_apart_from_layers_and_own_shortcuts_are_marked(spec):
    summary = _inspect_json(spec)
    blocks = {b["name"]: b["has_shortcut"] for b in summary["candidate_blocks"]}
    assert blocks == {"layers.2": "own", "layers.3": None, "layers.4": "own"}
    assert [b["name"] for b in summary["candidate_layers"]] == ["layers.0", "layers.1"]
    result = runner.invoke(app, ["inspect", spec, "--input-shape", "2,3,8,8"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "yes (its" in result.output and "single layers (not listed as blocks): 2" in result.output
    assert "Conv2d ×1, BatchNorm2d ×1" in result.output


def test_blocks_wrapped_by_graphtricks_are_marked(spec):
    from graphtricks.io.specs import load_model

    result = gt.rewrite(load_model(spec), [gt.AddResidual(["layers.3"])], (torch.randn(2, 3, 8, 8),))
    blocks = {b["name"]: b["has_shortcut"] for b in candidate_blocks(result.tree)}
    assert blocks["layers.3"] == "graphtricks" and blocks["layers.2"] == "own"


def test_wrapping_a_block_with_its_own_shortcut_is_noted(spec, tmp_path):
    from graphtricks.io.specs import load_model

    model, x = load_model(spec), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = gt.rewrite(model, [gt.AddResidual(["layers.2", "layers.3"])], (x,))
    noted = [w for w in result.report.warnings if "already has a shortcut" in w]
    assert len(noted) == 1 and "layers.2" in noted[0]
    cli = runner.invoke(app, ["rewrite", spec, "--input-shape", "2,3,8,8", "--residual", "layers.2", "--dry-run"],
                        terminal_width=200)
    assert cli.exit_code == 0, cli.output
    assert "layers.2: already has a shortcut" in cli.output


def test_long_candidate_lists_are_cut_with_a_count_and_a_hint():
    pytest.importorskip("torchvision")
    result = runner.invoke(app, ["inspect", "tv:mobilenet_v3_small", "--input-shape", "1,3,64,64"], terminal_width=200)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("│ features.")]
    assert len(rows) <= 20, result.output
    assert "more of" in result.output and "--verbose lists every one" in result.output
    assert "single layers (not listed as blocks)" in result.output and "Conv2d ×" in result.output
    assert "already add their input back" in result.output


def test_candidate_blocks_flags_from_the_library():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU()))
    tree = gt.rewrite(model, [], (torch.randn(1, 3, 4, 4),)).tree
    found = {b["name"]: (b["layer"], b["has_shortcut"]) for b in candidate_blocks(tree)}
    assert found["0"] == (True, None) and found["1"] == (False, None)
