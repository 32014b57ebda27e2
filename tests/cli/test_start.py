"""Issue 17, fast start: help without torch, usage errors before loading, --version, plain help, completion."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from graphtricks.cli import app
from tests.conftest import ROOT

runner = CliRunner()
CNN = f"{ROOT}/models/plain_cnn.py:PlainCNN"


def _fresh(code: str) -> str:
    """Run ``code`` in a new interpreter (this one has torch imported already)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_help_and_usage_errors_do_not_import_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from graphtricks.cli import app\n"
        "r = CliRunner()\n"
        "for args in (['--help'], ['rewrite', '--help'], ['inspect', '--help'], ['export', '--help'],\n"
        "             ['validate', '--help'], ['--version'],\n"
        "             ['rewrite', 'x.py:M', '--input-shape', '8x3', '--dropout', '0.1', '--dry-run'],\n"
        "             ['rewrite', 'x.py:M', '--input-shape', '8,3', '--dropout', '1.5', '--dry-run']):\n"
        "    r.invoke(app, args)\n"
        "print('torch' in sys.modules)\n"
    )
    assert _fresh(code) == "False"


def test_import_graphtricks_is_lazy_and_complete():
    code = (
        "import sys, graphtricks as gt\n"
        "before = 'torch' in sys.modules\n"
        "import graphtricks.rewriting, graphtricks.capturing.fold as fold\n"
        "missing = [n for n in gt.__all__ if not hasattr(gt, n)]\n"
        "print(before, callable(gt.rewrite), callable(gt.capture), missing)\n"
    )
    assert _fresh(code) == "False True True []"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dropout", "1.5"], "not a dropout probability"),
        (["--dropout", "-0.1"], "not a dropout probability"),
        (["--input-shape", "8x3x32x32"], "as in 8,3,32,32"),
        (["--input-shape", "4,three"], "is not a shape"),
    ],
)
def test_argument_ranges_are_usage_errors_before_loading(args, message):
    # the model spec does not exist: the range is refused before anything is loaded
    result = runner.invoke(app, ["rewrite", "/no/such/file.py:M", "--input-shape", "4,3,32,32", "--dry-run", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_version():
    import graphtricks

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and graphtricks.__version__ in result.output


@pytest.mark.parametrize("command", ["rewrite", "inspect", "export", "validate"])
def test_help_is_plain_with_an_example(command):
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output and "<list[str]>" not in result.output
    assert "Example:" in result.output and f"graphtricks {command} " in result.output


def test_recipe_help_keeps_its_brackets():
    result = runner.invoke(app, ["rewrite", "--help"], terminal_width=200)
    assert "[[passes]]" in result.output


def test_cli_choice_tables_agree_with_the_library():
    from graphtricks.cli.common import InputDtype
    from graphtricks.cli.rewrite_cmd import DropoutKind, Fan, Gate, InitScheme, LnOver, PostAct, Shortcut
    from graphtricks.io.inputs import DTYPES
    from graphtricks.layers.residual import GATES, POST_ACTS, SHORTCUTS
    from graphtricks.passes.bn_to_ln import LN_OVER
    from graphtricks.passes.dropout import DROPOUT_KINDS
    from graphtricks.passes.init import FAN_MODES, SCHEMES

    for cli, library in ((DropoutKind, DROPOUT_KINDS), (InputDtype, DTYPES), (Gate, GATES), (PostAct, POST_ACTS),
                         (Shortcut, SHORTCUTS), (LnOver, LN_OVER), (InitScheme, SCHEMES), (Fan, FAN_MODES)):
        assert [e.value for e in cli] == list(library), cli.__name__


def test_shell_completion_answers():
    env = {**os.environ, "_GRAPHTRICKS_COMPLETE": "complete_bash", "COMP_WORDS": "graphtricks rewrite --dropout-k", "COMP_CWORD": "2"}
    script = Path(sys.executable).parent / "graphtricks"  # the console script, as a shell would run it
    if not script.exists():
        pytest.skip("the graphtricks console script is not installed")
    done = subprocess.run([str(script)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert "--dropout-kind" in done.stdout, done.stderr
