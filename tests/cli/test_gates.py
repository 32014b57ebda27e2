"""Issue 17, gates: no dropout after a squeeze-excitation gate by default; --dropout-gates and --dropout-after."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from typer.testing import CliRunner

import graphtricks as gt
from graphtricks.cli import app

runner = CliRunner()


class SE(nn.Module):
    """Conv, ReLU, then a squeeze-excitation gate that scales the features."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Conv2d(8, 8, 1)
        self.gate = nn.Hardsigmoid()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.act(self.conv(x))
        s = self.gate(self.fc(x.mean((2, 3), keepdim=True)))
        x = x * s
        return self.head(torch.sigmoid(x).mean((2, 3)))


def _dropouts(model) -> int:
    return sum(isinstance(m, nn.Dropout) for m in model.modules())


def test_gates_are_skipped_by_default_and_counted():
    x = torch.randn(2, 4, 8, 8)
    result = gt.rewrite(SE(), [gt.InsertDropout(p=0.1)], (x,))
    # ReLU and the last sigmoid (not a gate: it feeds a mean) get dropout; the gate does not
    assert [c.where for c in result.report.changes] == ["act", "sigmoid"]
    # skipping gates is the default, not a problem: a count in the report, no warning (--strict passes)
    assert result.report.skipped == {"dropout": {"gates": 1}}
    assert not any("gate" in w for w in result.report.warnings)
    assert gt.Report.from_dict(result.report.to_dict()).skipped == {"dropout": {"gates": 1}}
    with_gates = gt.rewrite(SE(), [gt.InsertDropout(p=0.1, gates=True)], (x,))
    assert "gate" in [c.where for c in with_gates.report.changes]
    assert gt.InsertDropout(p=0.1, gates=True).config()["gates"] is True


def test_skipped_gates_are_no_python_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gt.rewrite(SE(), [gt.InsertDropout(p=0.1)], (torch.randn(2, 4, 8, 8),))
    assert not any(issubclass(w.category, gt.PassNoteWarning) for w in caught)


def test_strict_passes_a_model_with_gates_and_the_summary_counts_them(tmp_path):
    (tmp_path / "se.py").write_text("import torch\nfrom torch import nn\n" + _source())
    result = runner.invoke(app, ["rewrite", f"{tmp_path / 'se.py'}:SE", "--input-shape", "2,4,8,8", "--dropout", "0.1",
                                 "--strict", "--dry-run"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "1 gate(s) left without dropout" in result.output and "--dropout-gates" in result.output


def test_cli_gate_and_activation_flags(tmp_path, monkeypatch):
    (tmp_path / "se.py").write_text("import torch\nfrom torch import nn\n" + _source())
    spec = f"{tmp_path / 'se.py'}:SE"
    base = ["rewrite", spec, "--input-shape", "2,4,8,8", "--dropout", "0.1", "--dry-run", "--json"]
    import json

    default = json.loads(runner.invoke(app, base).stdout)
    assert default["report"]["changes_by_pass"] == {"dropout": 2}
    assert default["report"]["skipped"] == {"dropout": {"gates": 1}} and default["warnings"] == []
    gates = json.loads(runner.invoke(app, [*base, "--dropout-gates"]).stdout)
    assert gates["report"]["changes_by_pass"] == {"dropout": 3}
    relu = json.loads(runner.invoke(app, [*base, "--dropout-after", "relu"]).stdout)
    assert [c["where"] for c in relu["report"]["changes"]] == ["act"]


def _source() -> str:
    import inspect

    return inspect.getsource(SE)
