"""The checks validation owes its users, one file per family (numbered as in DESIGN.md).

1 and 2a ``numeric``; 2b ``dropout``; 2c ``stochastic``; 3 ``graphs``; 4 ``provenance``;
5 ``side_effects``; 6 ``mc`` (the MC-dropout graph, reusing 1, 2b and 3 as graph ``mc``). Export runs the train-graph checks too, before it writes anything.
Statistical checks share one bound: a count of ``n`` Bernoulli(``p``) trials must lie within
``SIGMAS`` binomial standard deviations of its mean.
"""

from __future__ import annotations

import math

__all__ = ["SIGMAS", "binomial_bound"]

SIGMAS = 5.0


def binomial_bound(n: int, p: float) -> float:
    """How far a count of ``n`` trials with probability ``p`` may stray from ``n * p``."""
    return SIGMAS * math.sqrt(n * p * (1 - p))
