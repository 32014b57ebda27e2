"""The checks validation owes its users, one file per family (numbered as in DESIGN.md).

1 and 2a ``numeric``; 2b ``dropout``; 2c ``stochastic``; 3 ``graphs``; 4 ``provenance``;
5 ``side_effects``; 6 ``mc`` (the MC-dropout graph, reusing 1, 2b and 3 as graph ``mc``). Export
runs the train-graph checks too, before it writes anything. Statistical checks share one bound
(``bounds``).
"""

from __future__ import annotations

from graphtricks.onnx.checks.bounds import SIGMAS, binomial_bound

__all__ = ["SIGMAS", "binomial_bound"]
