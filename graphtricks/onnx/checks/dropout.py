"""Check 2b: every train-mode dropout is in the graph and ONNX Runtime really executes it.

Train outputs cannot be compared element by element (ORT has its own RNG), so each Dropout is
measured on the node itself: a copy of the train graph exposes the node's input and output as
graph outputs. Among non-zero inputs, the kept fraction must lie within 5 binomial standard
deviations of 1 - p, and every survivor must be scaled by exactly 1 / (1 - p). A Dropout that
was eliminated, or left in inference mode, keeps everything and fails.

A dropout of the portable train graph (``graphtricks.onnx.portable``) is measured on its mask,
one independent draw per element (per sample and channel for channel dropout): among all mask
elements the kept fraction and the survivors' value 1 / (1 - p), and then the output must be
exactly ``data * mask``, so a mask drawn but not applied fails too. An alpha dropout
(``nn.AlphaDropout``, ``nn.FeatureAlphaDropout``) keeps at rate ``1 - p`` too, but its survivors'
mask value is ``a = 1 / sqrt((alpha^2 p + 1)(1 - p))``, and its output is ``data * mask + shift``
whose shift must be PyTorch's value where kept and where dropped
(:func:`graphtricks.onnx.twin.alpha_dropout_values`).

The count of Dropout nodes is checked against the dropouts PyTorch applies in one train-mode
forward, since a Dropout missing from the graph cannot be measured at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from graphtricks.errors import ExportError
from graphtricks.onnx.checks.bounds import SIGMAS, binomial_bound
from graphtricks.onnx.graph import DropoutInfo
from graphtricks.onnx.inputs import InputSet, session_feed
from graphtricks.onnx.report import CheckResult
from graphtricks.onnx.runtime import RunFailure, Session
from graphtricks.onnx.twin import alpha_dropout_values

__all__ = ["check_dropout_count", "check_dropout_rates"]

# Relative error allowed on a survivor's scale: a couple of ulps of the data type, since ORT
# multiplies by a scale computed from a ratio stored in float32.
_SCALE_RTOL = {np.dtype(np.float64): 1e-5, np.dtype(np.float32): 1e-5, np.dtype(np.float16): 2e-3}
_RATIO_ATOL = 1e-6  # a ratio of 0.1 stored in float32 reads back as 0.10000000149


def _active(info: DropoutInfo) -> bool:
    """Whether the node drops anything when run: training_mode on and ratio > 0."""
    return info.training is not False and (info.ratio is None or info.ratio > 0)


def check_dropout_count(
    infos: Sequence[DropoutInfo], eager_ps: Sequence[float], graph: str = "train"
) -> CheckResult:
    """Compares the train graph's active Dropout nodes with the dropouts PyTorch applies.

    Args:
        infos: The train graph's Dropout nodes.
        eager_ps: The drop probability of each dropout one train-mode PyTorch forward applied.
        graph: Which graph (``"train"``, or ``"mc"``: PyTorch then ran in eval mode with every
            dropout forced on).

    Returns:
        A result that fails when the counts or the sorted probabilities differ.
    """
    graph_ps = sorted(i.ratio if i.ratio is not None else math.nan for i in infos if _active(i))
    torch_ps = sorted(eager_ps)
    same = len(graph_ps) == len(torch_ps) and all(
        abs(a - b) <= _RATIO_ATOL for a, b in zip(graph_ps, torch_ps)
    )
    inert = [i.name for i in infos if not _active(i)]
    shown_graph, shown_torch = [round(p, 6) for p in graph_ps], [round(p, 6) for p in torch_ps]
    mode = "eval mode with dropout forced on" if graph == "mc" else f"{graph} mode"
    message = (
        f"{graph} graph has {len(graph_ps)} active Dropout node(s) with p={shown_graph}; "
        f"PyTorch {mode} applies {len(torch_ps)} with p={shown_torch}"
    )
    if inert:
        message += f"; inert Dropout node(s) (training_mode off or p=0): {inert}"
    if not same:
        message += "; a dropout was eliminated, added or changed by the export"
    return CheckResult(
        name="dropout_count", passed=same, message=message, graph=graph,
        details={"graph_p": graph_ps, "pytorch_p": torch_ps, "inert_nodes": inert},
    )


def _alpha_values(info: DropoutInfo, dtype: np.dtype) -> tuple[float, float, float] | None:
    """An alpha dropout's survivor scale and shifts (kept, dropped) for data of ``dtype``, None
    for another dropout or a dtype alpha dropout has no values for."""
    if info.shift is None or info.ratio is None:
        return None
    try:
        return alpha_dropout_values(info.ratio, torch.from_numpy(np.zeros(1, dtype)).dtype)
    except (TypeError, ExportError):
        return None


def _measure(info: DropoutInfo, x: np.ndarray, y: np.ndarray, base: CheckResult,
             scale: float | None = None) -> CheckResult:
    """Fills ``base`` with the keep-rate and scaling figures of one Dropout run; survivors must
    be ``x * scale`` (by default ``1 / (1 - p)``)."""
    where = f"{base.graph} Dropout '{info.name}' on {base.inputs}"
    if info.ratio is None:
        base.passed, base.message = False, f"{where}: ratio is not a constant, cannot check it"
        return base
    p = info.ratio
    nonzero = x != 0  # zeros in (after ReLU) stay zero whether dropped or not: leave them out
    n = int(np.count_nonzero(nonzero))
    kept = (y != 0) & nonzero
    k = int(np.count_nonzero(kept))
    bound = binomial_bound(n, p)
    rate_ok = abs(k - n * (1 - p)) <= bound if p > 0 else k == n
    scale = 1.0 / (1.0 - p) if scale is None else scale
    ratios = y[kept].astype(np.float64) / x[kept].astype(np.float64)
    scale_err = float(np.abs(ratios / scale - 1).max()) if k else 0.0
    rtol = _SCALE_RTOL.get(x.dtype, 1.6e-2)
    # An inert dropout keeps n of n: the test can only see that when n * p exceeds the bound.
    conclusive = p == 0 or n * p > bound
    base.max_rel, base.rtol = scale_err, rtol
    base.passed = bool(rate_ok and scale_err <= rtol)
    base.details = {
        "p": p, "nonzero_inputs": n, "kept": k, "keep_rate": k / n if n else None,
        "expected_keep_rate": 1 - p, "allowed_kept_deviation": bound, "sigmas": SIGMAS,
        "scale": scale, "conclusive": conclusive, "training_mode": info.training,
    }
    rate = f"kept {k}/{n} ({k / n if n else 0:.4f}) vs 1-p={1 - p:.4f} ± {bound:.1f} elements"
    if not rate_ok:
        base.message = f"{where}: {rate}: outside the {SIGMAS:g}-sigma bound"
        if k == n and p > 0:
            base.message += " (nothing dropped: eliminated or in inference mode)"
    elif scale_err > rtol:
        base.message = (
            f"{where}: survivors scaled by up to {scale_err:.3g} relative off {scale:.6g} "
            f"(rtol {rtol:g})"
        )
    else:
        base.message = f"{where}: {rate}; survivors x{scale:.6g}"
        if not conclusive:
            base.message += " (too few elements to tell an inert dropout apart)"
    return base


def check_dropout_rates(
    session: Session, infos: Sequence[DropoutInfo], input_sets: Sequence[InputSet],
    graph: str = "train",
) -> list[CheckResult]:
    """Measures every Dropout node of the train graph on every input set.

    Args:
        session: A session of the train graph copy from ``graph.exposed_dropout_copy``.
        infos: The Dropout nodes of the train graph, in graph order.
        input_sets: The inputs to run.
        graph: Which graph the session runs (``"train"`` or ``"mc"``), for the results.

    Returns:
        One result per Dropout node and input set.

    Raises:
        ValidationError: The inputs do not fit the graph.
    """
    names = session.output_names
    results = []
    for input_set in input_sets:
        feed = session_feed(session.inner, input_set.tensors, input_set.label)
        try:
            values = dict(zip(names, session.run(feed)))
        except RunFailure as e:
            results.append(
                CheckResult(
                    name="dropout_rate", passed=False, graph=graph, provider=session.provider,
                    seed=input_set.seed, inputs=input_set.label, message=f"{e}",
                )
            )
            continue
        for info in infos:
            base = CheckResult(
                name="dropout_rate", passed=False, message="", graph=graph,
                provider=session.provider, output=info.name, seed=input_set.seed,
                inputs=input_set.label,
            )
            if info.mask is None:
                results.append(_measure(info, values[info.data], values[info.output], base))
                continue
            results.append(_measure_mask(info, values, base, graph))
    return results


def _measure_mask(info: DropoutInfo, values: dict[str, np.ndarray], base: CheckResult,
                  graph: str) -> CheckResult:
    """A portable dropout's mask at rate and scale, applied: ``output = data * mask``, or for an
    alpha dropout ``data * mask + shift`` with PyTorch's shift where kept and where dropped."""
    mask = values[info.mask]
    alpha = _alpha_values(info, mask.dtype)
    if info.shift is not None and alpha is None:
        base.message = f"{graph} alpha dropout '{info.name}' on {base.inputs}: no values for {mask.dtype}"
        return base
    result = _measure(info, np.ones_like(mask), mask, base, alpha[0] if alpha else None)
    shift = values.get(info.shift) if info.shift is not None else None
    applied = _applied(values.get(info.data), mask, values.get(info.output), shift)
    if alpha is not None:
        # p is read back from a float32 ratio: PyTorch's values for it, within the scale's rtol
        expected = np.where(mask != 0, alpha[1], alpha[2])
        rtol = _SCALE_RTOL.get(mask.dtype, 1.6e-2)
        shifted = shift is not None and shift.shape == mask.shape and bool(
            np.allclose(shift, expected, rtol=rtol, atol=0))
        result.details["shift_values"] = shifted
        if result.passed and not shifted:
            result.passed = False
            result.message = (
                f"{graph} alpha dropout '{info.name}' on {base.inputs}: its shift is not PyTorch's "
                f"({alpha[1]:.6g} where kept, {alpha[2]:.6g} where dropped)"
            )
    if result.passed and not applied:
        result.passed = False
        result.message = (
            f"{graph} dropout '{info.name}' on {base.inputs}: its mask is drawn at rate "
            f"and scale but the output is not data * mask{' + shift' if info.shift else ''}"
        )
    result.details["mask_applied"] = applied
    return result


def _applied(data: np.ndarray | None, mask: np.ndarray, output: np.ndarray | None,
             shift: np.ndarray | None = None) -> bool:
    """Whether ``output`` is exactly ``data * mask`` (broadcast, as the graph multiplies), plus
    ``shift`` when given (alpha dropout)."""
    if data is None or output is None:
        return False
    try:
        expected = data * mask if shift is None else data * mask + shift
    except ValueError:
        return False
    return expected.shape == output.shape and bool(np.array_equal(expected, output, equal_nan=True))
