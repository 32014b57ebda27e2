"""Issues 17 and 25: every code block of the README runs as written, in order, on a clean copy of
the repository.

Shell blocks run command by command in the copy (``&&`` chains split, ``\\`` continuations joined,
comments dropped); Python blocks run as scripts from a scratch folder, with the copy as working
folder (the README's paths are relative to the clone). Blocks fenced as ``text`` are not code.

Left out, each for a reason it states (``SKIPPED``): installs (a package index: network, and they
would change the environment this test runs in) and the test run itself (it is the run this test
belongs to). Nothing else is.

The fast path, so that the test stays in the default run: ``graphtricks`` commands run in this
process through the same typer app the console script runs (no new interpreter and torch import
per command); other shell commands run in bash. ``FAST`` lists the settings trimmed for time
(the same command, fewer epochs), and nothing else is changed.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from graphtricks.cli import app
from tests.conftest import ROOT

_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "out", "__pycache__", "*.egg-info", ".pytest_cache", ".ci")
LANGUAGES = {"bash", "python", "text"}  # text: diagrams and listings, not code
SKIPPED = {
    "pip install": "installs from a package index (network) and would change the environment running these tests",
    "python -m pytest": "the test run this test belongs to",
}
# trimmed for time, same command otherwise: the experiment's claims are not what this test checks
FAST = {"--epochs 20": "--epochs 2"}
# commands that need an extra the README's test command installs: without it they are left out,
# and the test says so (skipped with the list) after running every other block
EXTRAS = {"graphtricks experiment": ("matplotlib", "sklearn"), "graphtricks rewrite hf:": ("transformers",)}


@dataclass
class Block:
    """A fenced code block of the README."""

    section: str
    language: str
    code: str


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block, in order, with the ``##`` section it is in."""
    blocks, section = [], ""
    for match in re.finditer(r"^## ([^\n]*)$|^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
        if match.group(1) is not None:
            section = match.group(1).strip()
        else:
            blocks.append(Block(section, match.group(2), match.group(3)))
    return blocks


def shell_commands(code: str) -> list[str]:
    """The commands of a shell block, as run: continuations joined, comments dropped, ``&&`` split."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split("  #")[0].split(" # ")[0].strip()
        if line and not line.startswith("#"):
            commands += [" ".join(part.split()) for part in line.split("&&")]
    return commands


def skip_reason(command: str) -> str | None:
    """Why a command is not run here, or None."""
    return next((why for head, why in SKIPPED.items() if command.startswith(head)), None)


def test_every_block_is_code_this_test_runs_or_text():
    blocks = readme_blocks((ROOT / "README.md").read_text())
    assert {b.language for b in blocks} <= LANGUAGES, [b.code[:60] for b in blocks if b.language not in LANGUAGES]
    commands = [c for b in blocks if b.language == "bash" for c in shell_commands(b.code)]
    assert commands[0].startswith("pip install torch --index-url https://download.pytorch.org/whl/cpu")
    assert any(c.startswith("graphtricks validate") for c in commands)
    assert any(c.startswith("graphtricks experiment") for c in commands)
    assert all("\\" not in c and "#" not in c for c in commands)
    skipped = [c for c in commands if skip_reason(c)]
    assert all(c.startswith(("pip install", "python -m pytest")) for c in skipped)
    assert any(b.language == "python" for b in blocks)


def test_the_set_up_installs_the_cpu_build_first_and_the_test_extras():
    commands = [c for b in readme_blocks((ROOT / "README.md").read_text()) if b.section == "Set up"
                for c in shell_commands(b.code)]
    installs = [c for c in commands if c.startswith("pip install")]
    assert "download.pytorch.org/whl/cpu" in installs[0]  # before anything pulls the CUDA build of torch
    test_install = next(c for c in installs if "test" in c)
    assert all(extra in test_install for extra in ("cpu", "test", "zoo", "report"))


def _missing_extra(command: str) -> list[str]:
    import importlib.util

    needs = [m for head, modules in EXTRAS.items() if command.startswith(head) for m in modules]
    return [m for m in needs if importlib.util.find_spec(m) is None]


def _run_graphtricks(command: str):
    args = shlex.split(command)[1:]
    return CliRunner().invoke(app, args, catch_exceptions=False)


def test_every_readme_block_runs_in_order(tmp_path, monkeypatch):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=_IGNORE)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.chdir(copy)
    ran, left_out = 0, []
    for i, block in enumerate(readme_blocks((copy / "README.md").read_text())):
        if block.language == "python":
            script = scratch / f"readme_block_{i}.py"
            script.write_text(block.code)
            done = subprocess.run([sys.executable, str(script)], cwd=copy, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{block.section}: python block\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
            ran += 1
            continue
        if block.language != "bash":
            continue
        for command in shell_commands(block.code):
            if skip_reason(command):
                continue
            if _missing_extra(command):
                left_out.append(f"{command.split(' --')[0]} (needs {', '.join(_missing_extra(command))})")
                continue
            for slow, quick in FAST.items():
                command = command.replace(slow, quick)
            if command.startswith("graphtricks "):
                result = _run_graphtricks(command)
                assert result.exit_code == 0, f"{command}\n{result.output[-3000:]}"
                warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
                assert not warnings, f"{command} prints warnings: {warnings}"  # a showcase prints none
            else:
                done = subprocess.run(command, shell=True, cwd=copy, capture_output=True, text=True, timeout=600)
                assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            ran += 1
    if left_out:
        pytest.skip(f"ran every other block; left out for a missing extra: {'; '.join(left_out)}")
    assert ran >= 12
