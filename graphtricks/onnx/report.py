"""Check results, the validation report and the tolerance table.

Every figure a check computes ends up in :class:`CheckResult`, and :meth:`ValidationReport.to_dict`
turns the whole report into plain JSON types, so the CLI can print it as a table or dump it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CheckResult", "Tolerance", "ToleranceTable", "ValidationReport", "default_tolerance"]


@dataclass(frozen=True)
class Tolerance:
    """An elementwise closeness bound: ``|actual - expected| <= atol + rtol * |expected|``."""

    atol: float
    rtol: float


# fp32 on CUDA gets 10x room even with TF32 off: cuDNN/cuBLAS pick other algorithms and other
# reduction orders than PyTorch's CPU kernels and ORT's MLAS. Integers and bools must match exactly.
_FLOAT_TOLERANCES: dict[tuple[str, torch.dtype], Tolerance] = {
    ("cpu", torch.float64): Tolerance(1e-8, 1e-7),
    ("cuda", torch.float64): Tolerance(1e-8, 1e-7),
    ("cpu", torch.float32): Tolerance(1e-5, 1e-4),
    ("cuda", torch.float32): Tolerance(1e-4, 1e-3),
    ("cpu", torch.float16): Tolerance(1e-3, 1e-2),
    ("cuda", torch.float16): Tolerance(1e-3, 1e-2),
    ("cpu", torch.bfloat16): Tolerance(1e-2, 5e-2),
    ("cuda", torch.bfloat16): Tolerance(1e-2, 5e-2),
}


def default_tolerance(
    dtype: torch.dtype, device: str, atol: float | None = None, rtol: float | None = None
) -> Tolerance:
    """The tolerance for comparing outputs of ``dtype`` computed on ``device``.

    Args:
        dtype: The PyTorch dtype of the output.
        device: ``"cpu"`` or ``"cuda"``: where both sides ran.
        atol: Overrides the absolute tolerance of floating-point outputs when given.
        rtol: Overrides the relative tolerance of floating-point outputs when given.

    Returns:
        The tolerance; exact (0, 0) for integer and bool outputs, whatever the overrides.
    """
    if not (dtype.is_floating_point or dtype.is_complex):
        return Tolerance(0.0, 0.0)
    base = _FLOAT_TOLERANCES.get((device, dtype), _FLOAT_TOLERANCES[(device, torch.float32)])
    return Tolerance(base.atol if atol is None else atol, base.rtol if rtol is None else rtol)


class ToleranceTable:
    """Hands out tolerances by output dtype and remembers which ones were used, for the report."""

    def __init__(self, device: str, atol: float | None = None, rtol: float | None = None) -> None:
        self.device, self.atol, self.rtol = device, atol, rtol
        self.used: dict[str, dict[str, float]] = {}

    def __call__(self, dtype: torch.dtype) -> Tolerance:
        tol = default_tolerance(dtype, self.device, self.atol, self.rtol)
        self.used[str(dtype).removeprefix("torch.")] = {"atol": tol.atol, "rtol": tol.rtol}
        return tol


def _json_number(value: float | None) -> float | str | None:
    """JSON has no NaN/Inf: spell them as strings so a report with them still dumps."""
    if value is None or math.isfinite(value):
        return value
    return str(value)


@dataclass
class CheckResult:
    """One check on one graph, output and input set.

    Attributes:
        name: The check, e.g. ``"infer_vs_eager"``, ``"train_deterministic"``, ``"dropout_rate"``.
        passed: Whether the check passed.
        message: One line: what was compared and, on failure, what went wrong.
        graph: ``"infer"``, ``"train"``, ``"mc"`` (MC dropout), ``"both"`` or ``None`` for model-level checks.
        provider: The execution provider that ran the graph (first of ``get_providers()``).
        output: The graph output (or Dropout node) the check is about.
        seed: The seed of the random inputs, ``None`` for user-supplied inputs.
        inputs: A label of the input set (``"seed=0"``, ``"extra[1]"``).
        max_abs: The largest absolute error.
        max_rel: The largest relative error (over elements larger than ``atol``).
        atol: The absolute tolerance used.
        rtol: The relative tolerance used.
        details: Any further figures (counts, bounds, names).
    """

    name: str
    passed: bool
    message: str
    graph: str | None = None
    provider: str | None = None
    output: str | None = None
    seed: int | None = None
    inputs: str | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    atol: float | None = None
    rtol: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Returns the result as JSON-able types (non-finite numbers as strings)."""
        return {
            "name": self.name,
            "passed": self.passed,
            "graph": self.graph,
            "provider": self.provider,
            "output": self.output,
            "seed": self.seed,
            "inputs": self.inputs,
            "max_abs": _json_number(self.max_abs),
            "max_rel": _json_number(self.max_rel),
            "atol": self.atol,
            "rtol": self.rtol,
            "message": self.message,
            "details": self.details,
        }


@dataclass
class ValidationReport:
    """Everything :func:`graphtricks.onnx.validate_pair` found.

    Attributes:
        checks: Every check, passed or not, in the order they ran.
        device: The device that was asked for after resolving ``"auto"``.
        seeds: The seeds of the random inputs.
        tolerances: Per output dtype, the ``{"atol", "rtol"}`` used.
        providers: Per ONNX session, what ``session.get_providers()`` returned.
        notes: Things a reader must know to trust the figures (e.g. a graph run on CPU).
        seconds: Wall time of the validation.
    """

    checks: list[CheckResult] = field(default_factory=list)
    device: str = "cpu"
    seeds: list[int] = field(default_factory=list)
    tolerances: dict[str, dict[str, float]] = field(default_factory=dict)
    providers: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """True when there is at least one check and every check passed."""
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[CheckResult]:
        """The checks that failed."""
        return [c for c in self.checks if not c.passed]

    def summary(self) -> str:
        """One line: how many checks passed, and the first failure if any."""
        total, failed = len(self.checks), self.failures
        if not failed:
            return f"{total}/{total} ONNX checks passed"
        passed = total - len(failed)
        return f"{passed}/{total} ONNX checks passed; first failure: {failed[0].message}"

    def to_dict(self) -> dict[str, Any]:
        """Returns the report as JSON-able types."""
        return {
            "passed": self.passed,
            "summary": self.summary(),
            "device": self.device,
            "seeds": list(self.seeds),
            "tolerances": self.tolerances,
            "providers": self.providers,
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
            "checks": [c.to_dict() for c in self.checks],
        }
