"""Issue 17: gt.export / gt.validate from Python, and validate's one-line-per-family summary."""

from __future__ import annotations

import re

import torch
from typer.testing import CliRunner

import graphtricks as gt
from graphtricks.cli import app
from graphtricks.io.specs import load_model
from tests.conftest import ROOT

runner = CliRunner()
CNN = f"{ROOT}/models/plain_cnn.py:PlainCNN"


def test_export_and_validate_from_python_and_the_summary(tmp_path):
    model = load_model(CNN)
    result = gt.rewrite(model, [gt.InsertDropout(p=0.1)], (torch.randn(2, 3, 32, 32),))
    out = tmp_path / "cnn"
    exported = gt.export(result, out, source={"spec": CNN})
    assert exported.train_path.is_file() and exported.infer_path.is_file()
    report = gt.validate(out, device="cpu")
    assert report.passed, report.summary()
    assert report.to_dict()["passed"] is True

    summary = runner.invoke(app, ["validate", str(out), "--device", "cpu"], terminal_width=200)
    assert summary.exit_code == 0, summary.output
    families = {c.name for c in report.checks}
    # a family row holds its count "passed/total" (rows may wrap at the console's width)
    rows = [line for line in summary.output.splitlines() if re.search(r"│ \d+/\d+ +│", line)]
    assert len(rows) == len(families) < len(report.checks)
    assert "--verbose lists every check" in summary.output
    every = runner.invoke(app, ["validate", str(out), "--device", "cpu", "--verbose"], terminal_width=200)
    assert every.exit_code == 0, every.output
    assert every.output.count("yes") == len(report.checks)
