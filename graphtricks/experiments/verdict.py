"""The verdict of a panel: did the claim hold, by how much, and how sure are we.

One rule for every panel, stated in the report beside each verdict::

    gain   = mean(after) − mean(before)        (sign flipped where lower is better)
    margin = max(2 × the larger std over seeds, the panel's smallest meaningful effect)
    held      when gain >  margin
    reversed  when gain < −margin
    not shown otherwise

The floor keeps a deterministic difference too small to matter (std 0 over seeds) from
counting as an effect.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

__all__ = ["RULE", "spread", "verdict"]

RULE = ("held when the mean gain exceeds both twice the larger standard deviation over seeds and {floor}; "
        "reversed when the mean loss does; not shown otherwise")


def spread(values: Sequence[float]) -> float:
    """Sample standard deviation over seeds (0 for a single seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(before: Sequence[float], after: Sequence[float], *, higher_is_better: bool = True,
            floor: float = 0.0, unit: str = "") -> dict[str, Any]:
    """Judge a claim from one metric per seed, before and after.

    Args:
        before: the original model's metric, one value per seed.
        after: the rewritten model's metric, same seeds.
        higher_is_better: direction of improvement.
        floor: the smallest gain that counts, in the metric's unit.
        unit: how the floor is written in the stated rule (e.g. "0.01 accuracy").

    Returns:
        ``{"verdict": "held" | "not shown" | "reversed", "before_mean", "after_mean",
        "difference", "spread", "margin", "rule"}``.

    Example:
        >>> verdict([0.84, 0.85, 0.83], [0.90, 0.91, 0.89], floor=0.01)["verdict"]
        'held'
    """
    values = [float(v) for v in (*before, *after)]
    if not before or not after or not all(math.isfinite(v) for v in values):
        raise ValueError(f"verdict needs finite values for both sides, got {list(before)} and {list(after)}")
    mb, ma = statistics.fmean(before), statistics.fmean(after)
    gain = (ma - mb) if higher_is_better else (mb - ma)
    sd = max(spread(before), spread(after))
    margin = max(2 * sd, floor)
    label = "held" if gain > margin else "reversed" if gain < -margin else "not shown"
    return {"verdict": label, "before_mean": mb, "after_mean": ma, "difference": ma - mb, "spread": sd,
            "margin": margin, "higher_is_better": higher_is_better,
            "rule": RULE.format(floor=unit or f"{floor:g}")}
