"""Issue 25: output readable at 80 columns — tables wrap their text, never a name; inspect's
opaque reasons in full."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from graphtricks.cli import app
from graphtricks.cli.common import err, out, print_table, table
from tests.conftest import ROOT

runner = CliRunner()
CNN = f"{ROOT}/models/plain_cnn.py:PlainCNN"
WIDTH = 80


@pytest.fixture
def eighty(monkeypatch):
    """Both consoles at 80 columns, as in a pipe or a small terminal."""
    for console in (out, err):
        monkeypatch.setattr(console, "_width", WIDTH)


def _cells(text: str) -> list[str]:
    """Every table cell's text, stripped (box characters are separators)."""
    return [c.strip() for line in text.splitlines() for c in re.split(r"[│┃]", line) if c.strip()]


def test_validate_table_keeps_check_names_whole_at_80_columns(tmp_path, eighty):
    folder = str(tmp_path / "cnn")
    assert runner.invoke(app, ["export", CNN, "--input-shape", "2,3,32,32", "--out", folder]).exit_code == 0
    result = runner.invoke(app, ["validate", folder])
    assert result.exit_code == 0, result.output
    assert max(map(len, result.stdout.splitlines())) <= WIDTH, result.stdout
    cells = _cells(result.stdout)
    for family in ("infer_vs_eager", "train_deterministic", "graphs_same_operators", "infer_has_no_train_ops"):
        assert family in cells, result.stdout  # one cell, not cut across two lines
    assert "CPU" in cells  # providers as short names, not CPUExecutionP / rovider


def test_a_table_wraps_its_text_and_grows_rather_than_break_a_name(eighty):
    long_name = "encoder.layer.11.attention.output.dense.some.deeper.module.path"
    made = table("changes", {"pass": "name", "where": "name", "what": "text"})
    made.add_row("dropout", long_name, "Dropout(p=0.1, inplace=False) after ReLU " * 3)
    made.add_row("dropout", "short", "x")
    with out.capture() as captured:
        print_table(made)
    text = captured.get()
    assert long_name in _cells(text)  # the name is whole, on one line
    assert "inplace=False)" in _cells(text) or any("inplace=False)" in c for c in _cells(text))
    assert not any(re.search(r"inplace=Fa$", c) for c in _cells(text))  # text wraps at spaces only
    short = table("t", {"name": "name", "text": "text"})
    short.add_row("a", "a sentence that is long enough to need wrapping at eighty columns " * 2)
    with out.capture() as captured:
        print_table(short)
    assert max(map(len, captured.get().splitlines())) <= WIDTH


def test_inspect_prints_the_whole_opaque_reason_wrapped(eighty):
    result = runner.invoke(app, ["inspect", f"{ROOT}/models/control_flow.py:DataDependent", "--input-shape",
                                 "2,3,16,16"])
    assert result.exit_code == 0, result.output
    tree = result.stdout.split("activations:")[0]
    assert max(map(len, tree.splitlines())) <= WIDTH, tree
    words = " ".join(re.sub(r"[│├└─]", " ", tree).split())
    assert "symbolically traced variables cannot be used as inputs to control flow" in words, tree
