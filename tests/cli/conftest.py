"""The CLI tests run at any machine speed: a progress line appears only where a test asks for it."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_progress_lines_unless_asked(monkeypatch):
    """A stage prints its progress line after ``PROGRESS_DELAY`` seconds outside a terminal; on a
    slow or loaded machine that would add lines to outputs the tests count. Tests of the progress
    lines set the delay themselves."""
    monkeypatch.setattr("graphtricks.cli.common.PROGRESS_DELAY", 600)
