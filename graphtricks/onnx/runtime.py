"""ONNX Runtime sessions: device choice, provider options and provenance.

A session silently falls back to CPU when the CUDA provider cannot load, so what ran is read
back from ``session.get_providers()`` rather than assumed from what was asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from graphtricks.errors import ValidationError

__all__ = [
    "DEVICES",
    "TRAIN_BN_DISABLED_OPTIMIZERS",
    "RunFailure",
    "Session",
    "cuda_available",
    "resolve_device",
    "make_session",
]

DEVICES = ("auto", "cpu", "cuda")

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"

# ORT's ConstantSharing optimizer merges equal initializers, e.g. a fresh BatchNorm's weight
# (ones) with its running_var (ones). Train-mode BatchNormalization writes its running stats into
# its input buffers before computing Y, so a merged scale is overwritten and Y is wrong, worse at
# every run (onnxruntime#29790, fix pending in #29878). Sessions of train graphs turn it off.
TRAIN_BN_DISABLED_OPTIMIZERS = ("ConstantSharing",)

# ORT's CUDA provider uses TF32 for fp32 matmul/conv by default, which alone exceeds fp32
# tolerances; PyTorch's side is switched off in eager.torch_numerics.
_CUDA_OPTIONS = {"device_id": "0", "use_tf32": "0"}


class RunFailure(Exception):
    """ONNX Runtime could not run a graph on valid inputs: a failed check, not a user error."""


def cuda_available() -> bool:
    """True when both onnxruntime-gpu's CUDA provider and a CUDA device for PyTorch exist."""
    return CUDA_PROVIDER in ort.get_available_providers() and torch.cuda.is_available()


def resolve_device(device: str) -> str:
    """Turns ``"auto"``, ``"cpu"`` or ``"cuda"`` into the device validation runs on.

    Args:
        device: What the user asked for.

    Returns:
        ``"cuda"`` or ``"cpu"``.

    Raises:
        ValidationError: ``device`` is unknown, or ``"cuda"`` was asked and is not available.
    """
    if device not in DEVICES:
        raise ValidationError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise ValidationError(
            "device='cuda' asked, but "
            + (
                "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu, "
                "and never together with onnxruntime)"
                if CUDA_PROVIDER not in ort.get_available_providers()
                else "PyTorch sees no CUDA device"
            )
            + "; use device='cpu' or 'auto'"
        )
    return device


@dataclass
class Session:
    """An ONNX Runtime session with what it is and where it really runs.

    Attributes:
        role: Which graph it runs (``"infer"``, ``"train_deterministic"``, ``"train_dropout"``).
        device: ``"cuda"`` or ``"cpu"``: where it runs, hence where PyTorch must run to compare.
        providers: ``session.get_providers()``.
        inner: The ``onnxruntime.InferenceSession``.
        asked: The device that was asked for: differs from ``device`` after a fallback.
        disabled_optimizers: The ORT graph optimizers turned off for this session.
    """

    role: str
    device: str
    providers: list[str]
    inner: Any
    asked: str = "cpu"
    disabled_optimizers: tuple[str, ...] = ()

    @property
    def provider(self) -> str:
        """The provider ONNX Runtime tries first for every node."""
        return self.providers[0]

    @property
    def output_names(self) -> list[str]:
        """The graph outputs, in order."""
        return [o.name for o in self.inner.get_outputs()]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Runs the graph.

        Raises:
            RunFailure: ONNX Runtime raised while running.
        """
        try:
            return self.inner.run(None, feed)
        except Exception as e:  # ORT raises its own pybind exception types
            raise RunFailure(f"ONNX Runtime failed to run the {self.role} graph: {e}") from e


def make_session(
    model: onnx.ModelProto,
    device: str,
    role: str,
    strict: bool = True,
    disabled_optimizers: tuple[str, ...] = (),
) -> Session:
    """Creates a session for ``model`` on ``device`` and checks where it landed.

    Args:
        model: The graph to run.
        device: ``"cuda"`` or ``"cpu"`` (already resolved).
        role: Names the graph in messages and in the report.
        strict: Raise when CUDA was asked and the session fell back to CPU; otherwise the
            session's ``device`` says ``"cpu"`` and the caller reports the fallback.
        disabled_optimizers: ONNX Runtime graph optimizers to turn off (see
            ``TRAIN_BN_DISABLED_OPTIMIZERS``).

    Returns:
        The session.

    Raises:
        ValidationError: ONNX Runtime cannot load the graph (e.g. an opset it does not
            support), or (``strict``) CUDA was asked and the session fell back to CPU.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the library never prints; ORT warns on unused initializers
    providers: list[Any] = [CPU_PROVIDER]
    if device == "cuda":
        providers = [(CUDA_PROVIDER, dict(_CUDA_OPTIONS)), CPU_PROVIDER]
    try:
        inner = ort.InferenceSession(
            model.SerializeToString(), options, providers=providers,
            disabled_optimizers=list(disabled_optimizers) or None,
        )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValidationError(f"ONNX Runtime cannot load the {role} graph: {first}") from e
    used = list(inner.get_providers())
    on_cuda = bool(used) and used[0] == CUDA_PROVIDER
    if device == "cuda" and not on_cuda and strict:
        raise ValidationError(
            f"the {role} graph was asked to run on CUDA but ONNX Runtime fell back to {used}; "
            "check the CUDA/cuDNN versions onnxruntime-gpu needs, or use device='cpu'"
        )
    return Session(
        role=role, device="cuda" if on_cuda else "cpu", providers=used, inner=inner,
        asked=device, disabled_optimizers=tuple(disabled_optimizers),
    )
