"""Export a model as a train-mode and an inference ONNX graph, and prove both match PyTorch.

Typical use::

    from graphtricks.onnx import export_pair, digest_model, validate_pair

    before = digest_model(model)
    export_pair(model, (x,), out_dir)
    report = validate_pair(model, (x,), out_dir, device="auto", baseline=before)
    assert report.passed, report.summary()

``digest_model`` records digests of a model's parameters, buffers and modes (the no-side-effects
check compares two); ``ModelSnapshot``/``snapshot_model`` are its old names, kept for one release.
"""

from graphtricks.onnx.eager import ModelDigest, digest_model
from graphtricks.onnx.export import (
    EXPORTERS,
    MAX_OPSET,
    MIN_OPSET,
    ExportResult,
    export_pair,
)
from graphtricks.onnx.names import INFER_FILE, MC_FILE, TRAIN_FILE
from graphtricks.onnx.report import (
    CheckResult,
    Tolerance,
    ValidationReport,
    default_tolerance,
)
from graphtricks.onnx.runtime import cuda_available
from graphtricks.onnx.validate import validate_pair

ModelSnapshot, snapshot_model = ModelDigest, digest_model  # old names

__all__ = [
    "EXPORTERS",
    "INFER_FILE",
    "MC_FILE",
    "MAX_OPSET",
    "MIN_OPSET",
    "TRAIN_FILE",
    "CheckResult",
    "ExportResult",
    "ModelDigest",
    "Tolerance",
    "ValidationReport",
    "cuda_available",
    "default_tolerance",
    "digest_model",
    "export_pair",
    "validate_pair",
]
