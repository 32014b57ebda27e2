"""Issue 17, progress: long stages report on stderr in plain lines when not on a terminal."""

from __future__ import annotations

import json
import re

import torch
from torch import nn
from typer.testing import CliRunner

import graphtricks as gt
from graphtricks.cli import app
from tests.conftest import ROOT

runner = CliRunner()
CNN = f"{ROOT}/models/plain_cnn.py:PlainCNN"


def test_rewrite_export_and_validate_print_plain_progress_lines(tmp_path, monkeypatch):
    monkeypatch.setattr("graphtricks.cli.common.PROGRESS_DELAY", 0)  # every stage, however short
    out = str(tmp_path / "cnn")
    result = runner.invoke(app, ["rewrite", CNN, "--input-shape", "2,3,32,32", "--dropout", "0.1", "--out", out])
    assert result.exit_code == 0, result.output
    assert "rewrite: pass dropout (3/3)" in result.stderr.splitlines()
    every = result.stderr.splitlines()
    result = runner.invoke(app, ["export", out])
    assert result.exit_code == 0, result.output
    assert "exporting the train graph (1/4)" in result.stderr.splitlines()
    every += result.stderr.splitlines()
    result = runner.invoke(app, ["validate", out])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("validating: ")]
    assert lines[0] == "validating: inference graph vs PyTorch eval (step 1/6)" and lines[-1].endswith("(step 6/6)")
    # issue 25: one whole line per stage, ending with its count; no line left open with "…"
    every += lines
    progress = [line for line in every if not line.startswith(("note:", "warning:"))]
    assert progress and all(re.search(r"\((step )?\d+/\d+\)$", line) for line in progress), progress
    quiet = runner.invoke(app, ["validate", out, "--json"])
    assert quiet.exit_code == 0 and "validating:" not in quiet.stderr
    assert json.loads(quiet.stdout)["passed"] is True


def test_quick_stages_and_errors_print_no_progress_line(tmp_path, monkeypatch):
    # a stage quicker than the delay prints nothing, and an error cancels the pending line (a
    # delay no test machine reaches: the test must not depend on how loaded the machine is)
    monkeypatch.setattr("graphtricks.cli.common.PROGRESS_DELAY", 600)
    result = runner.invoke(app, ["rewrite", CNN, "--input-shape", "4,5,32,32", "--dropout", "0.1", "--dry-run"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output


def test_the_library_reports_through_a_callback(tmp_path):
    model, x = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(2, 4)
    lines: list[str] = []
    result = gt.rewrite(model, [gt.InsertDropout(p=0.1), gt.Initialize()], (x,), progress=lines.append)
    assert [line for line in lines if "pass" in line] == ["rewrite: pass dropout (3/4)", "rewrite: pass init (4/4)"]
    lines.clear()
    gt.export(result.model, tmp_path, (x,), progress=lines.append)
    assert lines[0] == "exporting the train graph (1/4)"
    lines.clear()
    gt.validate(tmp_path, result.model, (x,), progress=lines.append)
    assert len(lines) == 6 and lines[2] == "validating: random draws (step 3/6)"
