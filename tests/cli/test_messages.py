"""Issue 17, messages: every pass warning printed, --strict, drift with its unit, empty selections, long tables."""

from __future__ import annotations

from typer.testing import CliRunner

from graphtricks.cli import app
from tests.conftest import ROOT

runner = CliRunner()
CNN = f"{ROOT}/models/plain_cnn.py:PlainCNN"
VGG = f"{ROOT}/models/plain_vgg.py:PlainVGG"
SHAPE = ["--input-shape", "2,3,32,32"]


def run(*args: str):
    return runner.invoke(app, list(args), terminal_width=200)


def test_pass_notes_are_printed_one_line_each(tmp_path):
    result = run("rewrite", VGG, *SHAPE, "--residual", "stages.*", "--init", "auto", "--zero-init-residual",
                 "--out", str(tmp_path / "vgg"))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "zero_init_residual left it" in line]
    assert len(lines) == 3 and all(line.startswith("warning: init: stages.") for line in lines)


def test_strict_turns_warnings_into_an_error_and_writes_nothing(tmp_path):
    out = tmp_path / "vgg"
    result = run("rewrite", VGG, *SHAPE, "--residual", "stages.*", "--init", "auto", "--zero-init-residual",
                 "--strict", "--out", str(out))
    assert result.exit_code == 1, result.output
    assert "--strict" in result.output and not out.exists()


def test_bn_to_ln_drift_is_shown_with_its_unit():
    result = run("rewrite", VGG, *SHAPE, "--bn-to-ln", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "drift" in result.output and "‖y_new − y_old‖ / ‖y_old‖" in result.output


def test_an_explicit_selection_that_matches_nothing_is_an_error_with_the_closest_names():
    result = run("rewrite", VGG, *SHAPE, "--residual", "stage.*", "--dry-run")
    assert result.exit_code == 1, result.output
    assert "'stage.*'" in result.output and "'stages." in result.output
    result = run("rewrite", CNN, *SHAPE, "--dropout", "0.1", "--include", "feature.2", "--dry-run")
    assert result.exit_code == 1, result.output
    assert "--include 'feature.2'" in result.output and "'features.2'" in result.output


def test_a_pass_without_selection_that_finds_nothing_stays_a_warning():
    result = run("rewrite", f"{ROOT}/models/encoder_block.py:TinyEncoder", "--input-shape", "2,6,32", "--bn-to-ln", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "matched nothing" in result.output


def test_long_change_tables_are_grouped_with_a_hint():
    args = ["rewrite", f"{ROOT}/models/mlp.py:MLP", "--input-shape", "4,32", "--model-arg", "depth=40",
            "--dropout", "0.1", "--dry-run"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "--verbose lists every change" in result.output
    assert len(result.output.splitlines()) < 25
    every = run(*args, "--verbose")
    assert every.exit_code == 0 and len(every.output.splitlines()) > 40
