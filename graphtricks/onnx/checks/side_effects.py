"""Check 5: export and validation left the model as they found it."""

from __future__ import annotations

from torch import nn

from graphtricks.onnx.eager import ModelDigest, digest_model
from graphtricks.onnx.report import CheckResult

__all__ = ["check_no_side_effects"]


def check_no_side_effects(before: ModelDigest, model: nn.Module) -> CheckResult:
    """Check 5: per-module modes, parameters and buffers are what they were."""
    changes = before.differences(digest_model(model))
    return CheckResult(
        name="no_side_effects", passed=not changes,
        message=f"the model changed: {changes[:5]}" if changes
        else f"modes of {len(before.modes)} modules and {len(before.tensors)} tensors unchanged",
        details={"changes": changes},
    )
