"""Closest valid names for a name that is not known: one line, for error messages.

Names of the word's own family (they start with its leading letters: ``vit_base_patch16_224``,
not ``samvit_base_patch16``, for ``vit_base_patch16``) come first; then names are ranked by edit
distance (a look-alike character, ``o`` for ``0``, costs half an edit: ``efficientnet_b0`` for
``efficientnet_bo``), then by the length of the prefix they share with the word.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["closest", "did_you_mean"]

# characters people type for one another; a swap between them costs half an edit
_LOOK_ALIKE = {frozenset(p) for p in ("o0", "l1", "i1", "il")}
_SHORTLIST = 40  # difflib picks this many candidates; the edit distance ranks them


def _distance(a: str, b: str) -> float:
    """Levenshtein distance, with look-alike substitutions at half cost."""
    row = [float(j) for j in range(len(b) + 1)]
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], float(i)
        for j, cb in enumerate(b, 1):
            swap = 0.0 if ca == cb else 0.5 if frozenset((ca, cb)) in _LOOK_ALIKE else 1.0
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + swap)
    return row[-1]


def _shared_prefix(a: str, b: str) -> int:
    n = 0
    for ca, cb in zip(a, b):
        if ca != cb:
            break
        n += 1
    return n


def _family(word: str) -> str:
    """The word's leading letters (``efficientnet`` of ``efficientnet_bo``), when there are 3 or more."""
    n = 0
    while n < len(word) and word[n].isalpha():
        n += 1
    return word[:n] if n >= 3 else ""


def closest(word: str, names: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """Up to ``n`` names most like ``word`` (case-insensitive), closest first.

    Candidates are the names whose difflib ratio is at least ``cutoff`` or that are within a
    third of the word's length in edits; they are ranked by edit distance, then by the prefix
    shared with ``word``, then by name; names of the word's family (its leading letters) first.
    """
    names = list(dict.fromkeys(names))
    by_lower: dict[str, str] = {}
    for name in names:
        by_lower.setdefault(name.lower(), name)
    low = word.lower()
    family = _family(low)
    shortlist = difflib.get_close_matches(low, list(by_lower), n=_SHORTLIST, cutoff=min(cutoff, 0.5))
    ranked = []
    for name in shortlist:
        distance = _distance(low, name)
        ratio = difflib.SequenceMatcher(None, low, name).ratio()
        if ratio >= cutoff or distance <= max(1, len(low) // 3):
            other_family = not (family and name.startswith(family))
            ranked.append((other_family, distance, -_shared_prefix(low, name), name))
    hits = [name for *_, name in sorted(ranked)[:n]]
    if not hits:  # a pattern or a prefix: names that start with its literal head
        head = word.split("*")[0].split("?")[0].split("[")[0].rstrip(".").lower()
        if head:
            hits = [k for k in by_lower if k.startswith(head) or head.startswith(k)][:n]
    return [by_lower[h] for h in hits]


def did_you_mean(word: str, names: Iterable[str], n: int = 3) -> str:
    """``"; did you mean 'a' or 'b'?"`` or ``""`` when nothing is close."""
    hits = closest(word, names, n)
    if not hits:
        return ""
    quoted = [repr(h) for h in hits]
    return "; did you mean " + (" or ".join(quoted) if len(quoted) < 3 else ", ".join(quoted[:-1]) + " or " + quoted[-1]) + "?"
