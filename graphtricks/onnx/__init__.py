"""Export a model as a train-mode and an inference ONNX graph, and prove both match PyTorch.

Typical use::

    from graphtricks.onnx import export_pair, snapshot_model, validate_pair

    before = snapshot_model(model)
    export_pair(model, (x,), out_dir)
    report = validate_pair(model, (x,), out_dir, device="auto", baseline=before)
    assert report.passed, report.summary()
"""

from graphtricks.onnx.eager import ModelSnapshot, snapshot_model
from graphtricks.onnx.export import (
    MAX_OPSET,
    MIN_OPSET,
    ExportResult,
    export_pair,
)
from graphtricks.onnx.names import INFER_FILE, TRAIN_FILE
from graphtricks.onnx.report import (
    CheckResult,
    Tolerance,
    ValidationReport,
    default_tolerance,
)
from graphtricks.onnx.runtime import cuda_available
from graphtricks.onnx.validate import validate_pair

__all__ = [
    "export_pair",
    "validate_pair",
    "snapshot_model",
    "cuda_available",
    "default_tolerance",
    "ExportResult",
    "ValidationReport",
    "CheckResult",
    "ModelSnapshot",
    "Tolerance",
    "TRAIN_FILE",
    "INFER_FILE",
    "MIN_OPSET",
    "MAX_OPSET",
]
