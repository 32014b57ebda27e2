"""Check 4: every ONNX Runtime session ran on the execution provider it was asked for."""

from __future__ import annotations

from collections.abc import Sequence

from graphtricks.onnx.report import CheckResult
from graphtricks.onnx.runtime import Session

__all__ = ["check_provenance"]


def check_provenance(sessions: Sequence[Session]) -> CheckResult:
    """Check 4: every session ran where it was asked to (read back from get_providers())."""
    fallen = sorted({s.role for s in sessions if s.asked != s.device})
    by_role = {s.role: s for s in sessions}
    listing = ", ".join(f"{role}: {s.providers[0]}" for role, s in by_role.items())
    return CheckResult(
        name="provenance", passed=not fallen, graph="both",
        message=f"sessions fell back to CPU though CUDA was asked: {fallen} ({listing})"
        if fallen
        else f"every session ran where asked ({listing})",
        details={
            s.role: {
                "asked": s.asked,
                "providers": s.providers,
                "disabled_optimizers": list(s.disabled_optimizers),
            }
            for s in by_role.values()
        },
    )
