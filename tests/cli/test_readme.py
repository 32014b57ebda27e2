"""Issue 17: the README's commands under "Set up" and "Command line" run, in order, on a copy of the repository.

Installs (``pip install ...``) and the whole test run (``python -m pytest``) are left out;
``graphtricks`` runs as ``python -m graphtricks`` with this interpreter.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SECTIONS = ("Set up", "Command line")
_SKIP = ("pip install", "python -m pytest")
_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "out", "__pycache__", "*.egg-info", ".pytest_cache", ".ci")


def readme_commands(text: str) -> list[str]:
    """Shell commands of the ```bash blocks under SECTIONS (to the next ``## `` heading), in order."""
    commands = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        if section.splitlines()[0].strip() not in SECTIONS:
            continue
        for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("  #")[0].split(" # ")[0].strip()
                if not line or line.startswith("#"):
                    continue
                parts = [p.strip() for p in line.split("&&")]
                kept = [p for p in parts if not p.startswith(_SKIP)]
                if kept:
                    commands.append(" && ".join(kept))
    return commands


def _runnable(command: str) -> str:
    python = shlex.quote(sys.executable)
    return re.sub(r"(^|&& )graphtricks ", rf"\1{python} -m graphtricks ", command)


def test_the_readme_commands_are_found():
    commands = readme_commands((ROOT / "README.md").read_text())
    assert commands[0].startswith("mkdir -p out && graphtricks rewrite models/plain_cnn.py:PlainCNN")
    assert any(c.startswith("graphtricks validate") for c in commands)
    assert not any(s in c for c in commands for s in _SKIP)
    assert all("\\" not in c and "#" not in c for c in commands)


@pytest.mark.slow
def test_the_readme_commands_run_in_order(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=_IGNORE)
    for command in readme_commands((ROOT / "README.md").read_text()):
        done = subprocess.run(_runnable(command), shell=True, cwd=copy, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
