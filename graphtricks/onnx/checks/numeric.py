"""Checks 1 and 2a: ONNX outputs against PyTorch, output by output and input set by input set.

Check 1 runs the inference graph against the model in eval mode. Check 2a runs the train graph
with every Dropout's ratio set to 0 and every random draw replaced by a fixed value
(``train_only.deterministic_train_copy``) against the model in train mode with dropout turned
into the identity and the same draws fixed (``draws``): stochastic depth keeps every sample,
scaled by ``1 / keep_prob``, on both sides. BatchNorm uses batch statistics on both sides,
which is what tells a train-mode BatchNormalization from an inference-mode one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from graphtricks.onnx.draws import Draw
from graphtricks.onnx.eager import reference_copy, run_reference
from graphtricks.onnx.inputs import InputSet, session_feed
from graphtricks.onnx.report import CheckResult, Tolerance
from graphtricks.onnx.runtime import RunFailure, Session

__all__ = ["check_infer_vs_eager", "check_train_deterministic", "compare_output"]


def _numpy_dtype(dtype: torch.dtype) -> np.dtype | None:
    """The numpy dtype of a torch dtype, None where numpy has none (bfloat16)."""
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:
        return None


def compare_output(
    actual: np.ndarray, expected: torch.Tensor, tol: Tolerance, base: CheckResult
) -> CheckResult:
    """Compares one ONNX output with its PyTorch twin: dtype, shape, finiteness, closeness.

    Args:
        actual: What ONNX Runtime returned.
        expected: What PyTorch returned.
        tol: The tolerance for this dtype and device.
        base: A result carrying name, graph, provider, output, seed and inputs; it is filled in.

    Returns:
        ``base`` with the verdict, errors and tolerances set.
    """
    base.atol, base.rtol = tol.atol, tol.rtol
    where = f"{base.graph} output '{base.output}' on {base.inputs}"
    want = _numpy_dtype(expected.dtype)
    if want is not None and actual.dtype != want:
        base.passed, base.message = False, f"{where}: dtype {actual.dtype}, PyTorch gives {want}"
        return base
    if tuple(actual.shape) != tuple(expected.shape):
        base.passed = False
        base.message = (
            f"{where}: shape {tuple(actual.shape)}, PyTorch gives {tuple(expected.shape)}"
        )
        return base
    got = actual.astype(np.float64)
    ref = expected.to(torch.float64).numpy() if expected.numel() else np.zeros(expected.shape)
    if not np.isfinite(got).all():
        bad, theirs = int((~np.isfinite(got)).sum()), int((~np.isfinite(ref)).sum())
        base.passed = False
        base.message = f"{where}: {bad} NaN/Inf value(s) (PyTorch has {theirs})"
        return base
    err = np.abs(got - ref)
    base.max_abs = float(err.max()) if err.size else 0.0
    big = np.abs(ref) > max(tol.atol, np.finfo(np.float64).tiny)
    base.max_rel = float((err[big] / np.abs(ref[big])).max()) if big.any() else 0.0
    excess = err - (tol.atol + tol.rtol * np.abs(ref))
    base.passed = bool((excess <= 0).all())
    if base.passed:
        base.message = f"{where}: max abs {base.max_abs:.3g}, max rel {base.max_rel:.3g}"
    else:
        worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(excess)), excess.shape))
        base.message = (
            f"{where}: max abs error {base.max_abs:.3g} (max rel {base.max_rel:.3g}) exceeds "
            f"atol={tol.atol:g} + rtol={tol.rtol:g}*|expected|; worst element {worst}: "
            f"{got[worst]:.6g} vs PyTorch {ref[worst]:.6g}"
        )
    return base


def _compare_all(
    check: str,
    graph: str,
    session: Session,
    input_set: InputSet,
    expected: Sequence[torch.Tensor],
    tolerance: Callable[[torch.dtype], Tolerance],
) -> list[CheckResult]:
    """Runs ``session`` on one input set and compares every main output with ``expected``."""

    def result(output: str | None) -> CheckResult:
        return CheckResult(
            name=check, passed=False, message="", graph=graph, provider=session.provider,
            output=output, seed=input_set.seed, inputs=input_set.label,
        )

    feed = session_feed(session.inner, input_set.tensors, input_set.label)
    names = session.output_names
    try:
        actual = session.run(feed)
    except RunFailure as e:
        failed = result(None)
        failed.message = f"{graph} graph on {input_set.label}: {e}"
        return [failed]
    if len(names) != len(expected):
        failed = result(None)
        failed.message = (
            f"{graph} graph has {len(names)} output(s) ({', '.join(names)}), "
            f"PyTorch returns {len(expected)}"
        )
        return [failed]
    return [
        compare_output(got, ref, tolerance(ref.dtype), result(name))
        for name, got, ref in zip(names, actual, expected)
    ]


def _reference(model: nn.Module, copy: nn.Module | None, train: bool, device: str) -> nn.Module:
    """``copy`` switched to the mode, else a new reference copy of ``model``."""
    if copy is None:
        return reference_copy(model, train=train, device=device)
    return copy.to(device).train(train)


def check_infer_vs_eager(
    session: Session,
    model: nn.Module,
    input_sets: Sequence[InputSet],
    tolerance: Callable[[torch.dtype], Tolerance],
    reference: nn.Module | None = None,
) -> list[CheckResult]:
    """Check 1: the inference graph against a copy of ``model`` in eval mode.

    Args:
        session: The inference graph's session.
        model: The PyTorch model (not changed: a copy runs).
        input_sets: The inputs to compare on.
        tolerance: Gives the tolerance of an output dtype.
        reference: A copy of ``model`` from :func:`~graphtricks.onnx.eager.reference_copy` to
            run (set to eval mode here), so that several checks share one copy; None: a new one.

    Returns:
        One result per output and input set, plus a failure if PyTorch drops out in eval mode.

    Raises:
        ValidationError: The inputs do not fit the graph, or the model rejects them.
    """
    reference = _reference(model, reference, train=False, device=session.device)
    results, eval_dropouts = [], []
    for input_set in input_sets:
        expected, seen = run_reference(
            reference, input_set.tensors, device=session.device, neutralise=False
        )
        eval_dropouts.extend(seen.calls)
        results += _compare_all("infer_vs_eager", "infer", session, input_set, expected, tolerance)
    if eval_dropouts:
        results.append(
            CheckResult(
                name="eager_eval_is_deterministic", passed=False, graph=None,
                message=f"PyTorch applies dropout in eval mode (p={sorted(set(eval_dropouts))}); "
                "an fx graph traced in train mode bakes training=True in: "
                "trace it in eval mode too",
            )
        )
    return results


def check_train_deterministic(
    session: Session,
    model: nn.Module,
    input_sets: Sequence[InputSet],
    tolerance: Callable[[torch.dtype], Tolerance],
    reference: nn.Module | None = None,
) -> tuple[list[CheckResult], list[float], list[Draw]]:
    """Check 2a: the train graph made deterministic against the model in train mode.

    Args:
        session: A session of the train graph's deterministic copy (Dropout ratios 0, random
            draws fixed).
        model: The PyTorch model (not changed: a copy runs, and its running stats move).
        input_sets: The inputs to compare on.
        tolerance: Gives the tolerance of an output dtype.
        reference: A copy of ``model`` to run (set to train mode here); None: a new one.

    Returns:
        One result per output and input set, the drop probabilities PyTorch applied in one
        train-mode forward (for the Dropout count check), and the random draws it made (for the
        random-draw checks).

    Raises:
        ValidationError: The inputs do not fit the graph, or the model rejects them.
    """
    reference = _reference(model, reference, train=True, device=session.device)
    results: list[CheckResult] = []
    per_forward: list[float] = []
    draws: list[Draw] = []
    for i, input_set in enumerate(input_sets):
        expected, seen = run_reference(
            reference, input_set.tensors, device=session.device, neutralise=True
        )
        if i == 0:
            per_forward, draws = seen.calls, seen.draws
        results += _compare_all(
            "train_deterministic", "train", session, input_set, expected, tolerance
        )
    return results, per_forward, draws
