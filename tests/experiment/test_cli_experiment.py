"""``graphtricks experiment``: a report on success; one clear line, exit 1 and nothing written on user errors."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from graphtricks.cli import app

TINY = "tests/experiment/tiny.py:TinyMLP"


def run(*args):
    return CliRunner().invoke(app, ["experiment", *map(str, args)])


def test_json_run(tmp_path, recipe):
    out = tmp_path / "exp"
    result = run(TINY, "--data", "digits", "--recipe", recipe("dropout", 'pass = "dropout"\np = 0.5'), "--out", out,
                 "--seeds", 2, "--epochs", 1, "--train-size", 200, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["panels"][0]["verdict"] in ("held", "not shown", "reversed")
    assert (out / "report.html").is_file() and (out / payload["panels"][0]["figure"]).is_file()


def one_line_error(result, tmp_path, *expected):
    assert result.exit_code == 1, result.output
    text = result.output.strip()
    assert "\n" not in text and "Traceback" not in text, text
    assert text.startswith("error:"), text
    for part in expected:
        assert part in text, text
    assert not (tmp_path / "exp").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


@pytest.mark.parametrize("data, expected", [
    ("mnist", ["unknown data set 'mnist'", "digits"]),
    ("npz:missing.npz", ["no such file"]),
])
def test_bad_data(tmp_path, recipe, data, expected):
    result = run(TINY, "--data", data, "--recipe", recipe("d", 'pass = "dropout"\np = 0.5'), "--out", tmp_path / "exp")
    one_line_error(result, tmp_path, *expected)


def test_npz_without_labels(tmp_path, recipe):
    import numpy as np

    np.savez(tmp_path / "data.npz", x=np.zeros((10, 64), np.float32))
    result = run(TINY, "--data", f"npz:{tmp_path / 'data.npz'}", "--recipe", recipe("d", 'pass = "dropout"\np = 0.5'),
                 "--out", tmp_path / "exp")
    one_line_error(result, tmp_path, "no array 'y'")


def test_recipe_that_does_not_apply(tmp_path, recipe):
    no_blocks = recipe("res", 'pass = "residual"\nblocks = ["nothing.*"]')
    one_line_error(run(TINY, "--data", "digits", "--recipe", no_blocks, "--out", tmp_path / "exp"),
                   tmp_path, "recipe res does not apply", "blocks pattern 'nothing.*' matches nothing")


def test_unknown_technique(tmp_path, recipe):
    one_line_error(run(TINY, "--data", "digits", "--recipe", recipe("x", 'pass = "mixup"'), "--out", tmp_path / "exp"),
                   tmp_path, "'mixup'", "training technique")


def test_output_does_not_fit_the_labels(tmp_path, recipe):
    result = run(TINY, "--model-arg", "classes=5", "--data", "digits", "--recipe", recipe("d", 'pass = "dropout"\np = 0.5'),
                 "--out", tmp_path / "exp")
    one_line_error(result, tmp_path, "shape (4, 5)", "10 classes")


def test_input_does_not_fit_the_model(tmp_path, recipe):
    result = run(TINY, "--data", "wine", "--recipe", recipe("d", 'pass = "dropout"\np = 0.5'), "--out", tmp_path / "exp")
    one_line_error(result, tmp_path, "rejects wine inputs")


def test_missing_matplotlib_says_how_to_install(tmp_path, recipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = run(TINY, "--data", "digits", "--recipe", recipe("d", 'pass = "dropout"\np = 0.5'), "--out", tmp_path / "exp")
    one_line_error(result, tmp_path, 'pip install -e ".[report]"')


def test_mc_dropout_run_with_known_classes(tmp_path, recipe):
    mc = recipe("mc", 'pass = "dropout"\np = 0.5', 'pass = "mc_dropout"\nsamples = 3')
    out = tmp_path / "exp"
    result = run("tests/experiment/tiny.py:DeepMLP", "--data", "digits", "--recipe", mc, "--out", out, "--seeds", 1,
                 "--epochs", 1, "--train-size", 100, "--known-classes", 10, "--json")
    one_line_error(result, tmp_path, "known_classes must be an integer from 2 to 9")
    result = run(TINY, "--data", "digits", "--recipe", mc, "--out", out, "--seeds", 1, "--epochs", 1,
                 "--train-size", 100, "--json")
    one_line_error(result, tmp_path, "--known-classes")
    result = run(TINY, "--model-arg", "classes=5", "--data", "digits", "--recipe", mc, "--out", out, "--seeds", 1,
                 "--epochs", 1, "--train-size", 100, "--known-classes", 5, "--json")
    assert result.exit_code == 0, result.output
    panels = {p["kind"]: p for p in json.loads(result.stdout)["panels"]}
    assert panels["unseen"]["before_name"] == "mc, deterministic" and (out / panels["unseen"]["figure"]).is_file()


def test_baseline_must_name_a_variant(tmp_path, recipe):
    result = run(TINY, "--data", "digits", "--recipe", recipe("d", 'pass = "dropout"\np = 0.5'),
                 "--recipe", recipe("e", 'pass = "dropout"\np = 0.2'), "--out", tmp_path / "exp", "--baseline", "x")
    one_line_error(result, tmp_path, "baseline 'x' must name one of the variants")
