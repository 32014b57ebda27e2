"""The one bound the statistical checks share: a count of ``n`` Bernoulli(``p``) trials must lie
within ``SIGMAS`` binomial standard deviations of its mean."""

from __future__ import annotations

import math

__all__ = ["SIGMAS", "binomial_bound"]

SIGMAS = 5.0


def binomial_bound(n: int, p: float) -> float:
    """How far a count of ``n`` trials with probability ``p`` may stray from ``n * p``."""
    return SIGMAS * math.sqrt(n * p * (1 - p))
