"""Shared helpers of the experiment tests: one torch thread, recipe files, the tiny models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def recipe(tmp_path):
    """Write a recipe: ``recipe("name", 'pass = "dropout"\\np = 0.5')`` → its path."""

    def write(name: str, *entries: str) -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text("".join(f"[[passes]]\n{e}\n\n" for e in entries))
        return path

    return write
