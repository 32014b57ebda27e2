"""Check 3: the train and inference graphs against each other, without running them.

Both graphs must be the same model: the same inputs and outputs, identical weights, and the
same operators once train-only ones are set aside: Dropout, the random subgraphs of stochastic
depth with the node applying their mask, and the constants only they read
(:mod:`graphtricks.onnx.train_only`). The inference graph must hold no train-only operator.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper

from graphtricks.onnx.graph import (
    TRAIN_ONLY_OPS,
    initializer_arrays,
    io_signature,
    train_mode_batchnorms,
)
from graphtricks.onnx.report import CheckResult
from graphtricks.onnx.train_only import operator_multiset, train_only_feeds

__all__ = ["check_io", "check_weights", "check_operators", "check_infer_has_no_train_ops"]


def _describe(signature: list[tuple]) -> list[str]:
    return [
        f"{name}:{helper.tensor_dtype_to_np_dtype(t) if t else '?'}/rank{rank}"
        for name, t, rank in signature
    ]


def check_io(train: onnx.ModelProto, infer: onnx.ModelProto) -> CheckResult:
    """Same graph inputs and outputs: names, element types and ranks, in order.

    Args:
        train: The train graph.
        infer: The inference graph.

    Returns:
        The result; on failure the message lists both signatures.
    """
    (t_in, t_out), (i_in, i_out) = io_signature(train), io_signature(infer)
    problems = []
    if t_in != i_in:
        problems.append(f"inputs differ: train {_describe(t_in)} vs infer {_describe(i_in)}")
    if t_out != i_out:
        problems.append(f"outputs differ: train {_describe(t_out)} vs infer {_describe(i_out)}")
    message = "; ".join(problems) or (
        f"same {len(t_in)} input(s) and {len(t_out)} output(s): {', '.join(_describe(t_out))}"
    )
    return CheckResult(
        name="graphs_same_io", passed=not problems, message=message, graph="both",
        details={"inputs": _describe(t_in), "outputs": _describe(t_out)},
    )


def _content_key(array: np.ndarray) -> tuple:
    """Identifies an array by dtype, shape and bytes, to match weights stored under other names."""
    digest = hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).hexdigest()
    return str(array.dtype), array.shape, digest


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    skip = train_only_feeds(model)
    return {k: v for k, v in initializer_arrays(model).items() if k not in skip}


def _unmatched(mine: Mapping[str, np.ndarray], theirs: Mapping[str, np.ndarray]) -> list[str]:
    """Names in ``mine`` absent from ``theirs`` whose content no weight of ``theirs`` has."""
    keys = {_content_key(v) for v in theirs.values()}
    return sorted(k for k, v in mine.items() if k not in theirs and _content_key(v) not in keys)


def check_weights(train: onnx.ModelProto, infer: onnx.ModelProto) -> CheckResult:
    """Identical weights: every initializer equal bit for bit, matched by name, else by content.

    Args:
        train: The train graph.
        infer: The inference graph.

    Returns:
        The result, naming the first differing weights and the largest difference.
    """
    tw, iw = _weights(train), _weights(infer)
    differing, max_abs = [], 0.0
    for name in sorted(set(tw) & set(iw)):
        a, b = tw[name], iw[name]
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            differing.append(name)
            if a.shape == b.shape and a.dtype.kind in "fiu":
                max_abs = max(max_abs, float(np.abs(a.astype(np.float64) - b).max(initial=0)))
    only_train, only_infer = _unmatched(tw, iw), _unmatched(iw, tw)
    problems = []
    if differing:
        problems.append(f"weights differ: {differing[:5]} (max abs difference {max_abs:.3g})")
    if only_train:
        problems.append(f"only in train graph: {only_train[:5]}")
    if only_infer:
        problems.append(f"only in infer graph: {only_infer[:5]}")
    shared = len(set(tw) & set(iw))
    return CheckResult(
        name="graphs_same_weights", passed=not problems, graph="both",
        max_abs=max_abs if differing else 0.0, atol=0.0, rtol=0.0,
        message="; ".join(problems) or f"{shared} weight(s) identical in both graphs",
        details={
            "differing": differing, "only_train": only_train, "only_infer": only_infer,
            "train_count": len(tw), "infer_count": len(iw),
        },
    )


def check_operators(train: onnx.ModelProto, infer: onnx.ModelProto) -> CheckResult:
    """The same operator multiset in both graphs, train-only operators aside.

    Args:
        train: The train graph.
        infer: The inference graph.

    Returns:
        The result; on failure the message lists the operators whose counts differ.
    """
    tc, ic = operator_multiset(train), operator_multiset(infer)
    diff = {
        f"{op}" if domain == "ai.onnx" else f"{domain}.{op}": (tc[(domain, op)], ic[(domain, op)])
        for domain, op in sorted(set(tc) | set(ic))
        if tc[(domain, op)] != ic[(domain, op)]
    }
    message = (
        "operator counts differ (train, infer): "
        + ", ".join(f"{op}={counts}" for op, counts in diff.items())
        if diff
        else f"same {sum(tc.values())} operators besides train-only ones"
    )
    return CheckResult(
        name="graphs_same_operators", passed=not diff, message=message, graph="both",
        details={"differing": {k: list(v) for k, v in diff.items()}},
    )


def check_infer_has_no_train_ops(infer: onnx.ModelProto) -> CheckResult:
    """The inference graph holds no Dropout, no random operator and no train-mode BatchNorm.

    Args:
        infer: The inference graph.

    Returns:
        The result, naming the offending nodes.
    """
    offenders = [
        n.name or f"{n.op_type}#{i}"
        for i, n in enumerate(infer.graph.node)
        if n.op_type in TRAIN_ONLY_OPS
    ] + train_mode_batchnorms(infer)
    return CheckResult(
        name="infer_has_no_train_ops", passed=not offenders, graph="infer",
        message=f"inference graph holds train-only nodes: {offenders[:5]}"
        if offenders
        else "inference graph holds no Dropout, random operator or train-mode BatchNormalization",
        details={"offenders": offenders},
    )
