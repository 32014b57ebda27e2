"""Issue 25, a new user's first hour: nothing half-written, Ctrl-C in one line, inputs checked
against each other, and path errors answered before torch is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from graphtricks.cli import INTERRUPTED, app, main
from graphtricks.errors import ExportError, InputShapeError
from graphtricks.io.inputs import check_inputs_agree
from tests.conftest import ROOT

runner = CliRunner()
CNN = f"{ROOT}/models/plain_cnn.py:PlainCNN"
SHAPE = ["--input-shape", "2,3,32,32"]


class Tokens(nn.Module):
    """Token ids and an attention mask, as a text model takes them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, input_ids, attention_mask=None):
        h = torch.relu(self.embed(input_ids))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return self.fc(h)


TOKENS = f"{__file__}:Tokens"


def _fail(exc):
    def export_pair(*args, **kwargs):
        raise exc

    return export_pair


@pytest.mark.parametrize("exc", [ExportError("the exporter failed"), KeyboardInterrupt()], ids=["failure", "ctrl-c"])
def test_export_of_a_spec_leaves_nothing_behind_and_the_rerun_is_not_refused(tmp_path, monkeypatch, exc):
    target = tmp_path / "cnn"
    with monkeypatch.context() as m:  # the saved model is written, then the export stage fails
        m.setattr("graphtricks.onnx.export_pair", _fail(exc))
        result = runner.invoke(app, ["export", CNN, *SHAPE, "--out", str(target)])
    if isinstance(exc, KeyboardInterrupt):
        assert result.exit_code == 130 and result.stderr == INTERRUPTED + "\n", result.output
    else:
        assert result.exit_code == 1 and "the exporter failed" in result.stderr, result.output
    assert list(tmp_path.iterdir()) == []  # no folder, no hidden staging folder, no saved model
    again = runner.invoke(app, ["export", CNN, *SHAPE, "--out", str(target)])
    assert again.exit_code == 0, again.output
    assert {"model.safetensors", "recipe.toml", "model.train.onnx", "model.infer.onnx"} <= {
        p.name for p in target.iterdir()}
    assert f"wrote {target / 'model.train.onnx'}" in again.stdout  # the final paths, not the staging ones


def test_export_of_a_spec_into_an_empty_folder_and_as_json(tmp_path):
    target = tmp_path / "cnn"
    target.mkdir()  # an empty --out is accepted and filled
    result = runner.invoke(app, ["export", CNN, *SHAPE, "--out", str(target), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["train_path"] == str(target / "model.train.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn"]


def test_ctrl_c_through_the_console_script_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("graphtricks.onnx.export_pair", _fail(KeyboardInterrupt()))
    monkeypatch.setattr(sys, "argv", ["graphtricks", "export", CNN, *SHAPE, "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 130
    assert capsys.readouterr().err == INTERRUPTED + "\n"
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_rewrite_writes_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_model", interrupted)
    result = runner.invoke(app, ["rewrite", CNN, *SHAPE, "--dropout", "0.1", "--out", str(tmp_path / "cnn")])
    assert result.exit_code == 130 and result.stderr == INTERRUPTED + "\n", result.output
    assert list(tmp_path.iterdir()) == []


# -- inputs checked against each other ----------------------------------------------------


def test_a_token_input_of_another_length_is_one_line_at_rewrite(tmp_path):
    out = tmp_path / "t"
    args = ["rewrite", TOKENS, "--input-shape", "2,16", "--input-dtype", "int64", "--dropout", "0.1", "--out", str(out)]
    result = runner.invoke(app, [*args, "--input", "attention_mask=2,17:int64"])
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1
    assert "attention_mask has sequence length 17" in result.stderr and "input_ids has 16" in result.stderr
    assert "give attention_mask=2,16:int64" in result.stderr
    assert not out.exists()
    fine = runner.invoke(app, [*args, "--input", "attention_mask=2,16:int64"])
    assert fine.exit_code == 0, fine.output


def test_a_keyword_input_of_another_batch_is_one_line_at_rewrite(tmp_path):
    spec = f"{ROOT}/tests/keyword_models.py:Mixed"
    result = runner.invoke(app, ["rewrite", spec, "--input-shape", "2,8", "--input", "scale=3,4", "--dry-run"])
    assert result.exit_code == 1, result.output
    assert "scale has batch size 3 (dimension 0 of 3,4) but x has 2" in result.stderr


def test_inputs_agree_rules():
    ids, mask = torch.zeros(2, 16, dtype=torch.int64), torch.ones(2, 16, dtype=torch.int64)
    check_inputs_agree((ids,), {"attention_mask": mask})
    check_inputs_agree((ids,), {"position_ids": torch.zeros(1, 16, dtype=torch.int64)})  # batch 1 broadcasts
    check_inputs_agree((torch.randn(2, 8),), {"extra": torch.randn(2, 3)})  # float features: no length to share
    check_inputs_agree((torch.randn(2, 3, 8, 8),), {"labels": torch.zeros(2, 5, dtype=torch.int64)})
    check_inputs_agree((), {"x": torch.randn(4, 8), "mask": torch.ones(4, 16)})
    with pytest.raises(InputShapeError, match="mask has batch size 3"):
        check_inputs_agree((), {"x": torch.randn(4, 8), "mask": torch.ones(3, 16)})
    with pytest.raises(InputShapeError, match="token_type_ids has sequence length 15"):
        check_inputs_agree((ids,), {"token_type_ids": torch.zeros(2, 15, dtype=torch.int64)})


# -- path errors before torch ----------------------------------------------------------------


def _cli_without_torch(args: list[str], cwd) -> tuple[int, str, bool]:
    """Run the console script in a fresh interpreter: exit code, stderr, whether torch got imported."""
    code = (
        "import sys\nfrom graphtricks.cli import main\n"
        f"sys.argv = ['graphtricks', *{args!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print(code, 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    exit_code, torch_loaded = done.stdout.split()
    return int(exit_code), done.stderr, torch_loaded == "True"


def test_path_errors_are_answered_before_torch_is_imported(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    saved = tmp_path / "saved"  # a saved model without its ONNX graphs
    saved.mkdir()
    (saved / "recipe.toml").write_text("")
    (saved / "model.safetensors").write_text("")
    cases = [
        (["rewrite", "missing.py:Net", "--input-shape", "1,3", "--dropout", "0.1", "--out", "o"],
         "model file missing.py does not exist"),
        (["rewrite", CNN, "--input-shape", "1,3", "--out", "full"], "--out full is not empty"),
        (["inspect", "nothere/"], "folder nothere/ does not exist"),
        (["export", "out/does_not_exist"], "folder out/does_not_exist does not exist"),
        (["export", CNN, "--input-shape", "1,3", "--out", "full"], "--out full is not empty"),
        (["validate", "out/does_not_exist"], "folder out/does_not_exist does not exist"),
        (["validate", "saved"], "run `graphtricks export saved` first"),
        (["experiment", CNN, "--data", "digits", "--recipe", "r.toml", "--out", "full"], "--out full is not empty"),
    ]
    for args, message in cases:
        code, stderr, torch_loaded = _cli_without_torch(args, tmp_path)
        assert code == 1 and message in stderr and stderr.count("\n") == 1, (args, stderr)
        assert not torch_loaded, args


def test_import_from_the_folder_holding_a_clone_gives_the_package(tmp_path):
    clone = tmp_path / "graphtricks"  # `git clone .../graphtricks.git` names the folder after the package
    clone.mkdir()
    (clone / "__init__.py").write_text((ROOT / "__init__.py").read_text())
    (clone / "graphtricks").symlink_to(ROOT / "graphtricks", target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed package, as a user has it
    code = "import graphtricks as gt; print(gt.__version__, callable(gt.rewrite), gt.__file__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr  # not an empty namespace package (AttributeError: __version__)
    version, rewrite_callable, path = done.stdout.split()
    assert rewrite_callable == "True" and path.endswith("__init__.py")


def test_experiment_help_speaks_like_the_other_commands():
    help_text = runner.invoke(app, ["experiment", "--help"], terminal_width=200).stdout
    assert "Example:" in help_text and "graphtricks experiment docs/evidence/models.py:WideMLP" in help_text
    for generic in ("INTEGER", "FLOAT", "TEXT", "PATH"):  # typer's defaults; the other commands name theirs
        assert generic not in help_text, generic
    for metavar in ("--out DIR", "--recipe FILE", "--seeds N", "--lr X", "--optimizer adam|sgd"):
        assert metavar in help_text, metavar


def test_experiment_report_words(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    monkeypatch.chdir(ROOT)
    recipe = tmp_path / "dropout.toml"
    recipe.write_text('[[passes]]\npass = "dropout"\np = 0.5\n')
    out = tmp_path / "exp"
    result = runner.invoke(app, ["experiment", "tests/experiment/tiny.py:TinyMLP", "--data", "digits", "--recipe",
                                 str(recipe), "--out", str(out), "--seeds", "2", "--epochs", "1", "--train-size", "100"])
    assert result.exit_code == 0, result.output
    assert "(1 panel," in result.stdout  # not "1 panels"
    html = (out / "report.html").read_text()
    assert "64 features" in html and "layout (" not in html
    # no batch-size sweep is listed where no panel shows one (only BN→LN's does)
    assert "batch_sizes" not in json.loads((out / "results.json").read_text())["config"]
