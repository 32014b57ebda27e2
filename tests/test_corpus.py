"""The real-model corpus (tests/corpus.py): a fast subset every run, the whole with -m slow."""

from __future__ import annotations

import pytest

from tests.corpus import CORPUS, run_entry

pytest.importorskip("torchvision")
pytest.importorskip("timm")
pytest.importorskip("transformers")


def _check(entry):
    row = run_entry(entry)
    assert row["ok"], row


@pytest.mark.parametrize("entry", [e for e in CORPUS if e.fast], ids=lambda e: e.name)
def test_corpus_fast_subset(entry):
    _check(entry)


@pytest.mark.slow
@pytest.mark.parametrize("entry", [e for e in CORPUS if not e.fast], ids=lambda e: e.name)
def test_corpus_whole(entry):
    _check(entry)


def test_corpus_is_big_and_varied():
    names = [e.name for e in CORPUS]
    assert len(names) >= 30
    assert {n.split(":")[0] for n in names} == {"tv", "timm", "hf"}
