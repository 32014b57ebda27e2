"""Closest valid names for a name that is not known: one line, for error messages."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["closest", "did_you_mean"]


def closest(word: str, names: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """Up to ``n`` names most like ``word`` (case-insensitive, difflib's ratio ≥ ``cutoff``)."""
    names = list(dict.fromkeys(names))
    by_lower: dict[str, str] = {}
    for name in names:
        by_lower.setdefault(name.lower(), name)
    hits = difflib.get_close_matches(word.lower(), list(by_lower), n=n, cutoff=cutoff)
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
