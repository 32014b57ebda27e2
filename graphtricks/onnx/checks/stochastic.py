"""Check 2c: the train graph's random subgraphs (stochastic depth) match PyTorch's random draws.

The count: one train-mode PyTorch forward makes as many random draws as the train graph has
random operators, of the same family (uniform or Bernoulli vs normal), paired in order (the
TorchScript exporter records operators in execution order). A stochastic depth the export lost,
or one PyTorch no longer applies, fails it.

The rate: a stochastic-depth mask is drawn once per sample, so a forward of a batch of 2 says
next to nothing about its keep rate. Each random subgraph of a Bernoulli draw with a scalar
probability is therefore cut out into a *probe* graph drawing ``SAMPLES`` values at once (the
random operator with its shape replaced, then the subgraph's own nodes, which must work
element by element). Its mask must hold only 0 and the all-kept value (what the
deterministic copy gives, itself checked against PyTorch by check 2a), and the fraction kept
must lie within ``SIGMAS`` binomial standard deviations of PyTorch's keep probability.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphtricks.errors import ValidationError
from graphtricks.onnx.checks.bounds import SIGMAS, binomial_bound
from graphtricks.onnx.draws import Draw
from graphtricks.onnx.graph import constant_values
from graphtricks.onnx.report import CheckResult
from graphtricks.onnx.runtime import RunFailure, make_session
from graphtricks.onnx.train_only import RandomSubgraph, deterministic_train_copy

__all__ = ["SAMPLES", "check_random_count", "check_random_rates"]

SAMPLES = 100_000
# Operators a probe may hold after its random node: each maps elements one to one, so a
# 1-D draw of SAMPLES values goes through them as a per-sample mask would.
_ELEMENTWISE = frozenset(
    {"Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal", "Not", "And", "Or", "Xor",
     "Cast", "CastLike", "Div", "Mul", "Add", "Sub", "Neg", "Abs", "Floor", "Ceil", "Identity",
     "Where", "Reciprocal", "Max", "Min"}
)
_DRAWN_AS = {
    "RandomUniformLike": "RandomUniform", "RandomNormalLike": "RandomNormal",
    "RandomUniform": "RandomUniform", "RandomNormal": "RandomNormal",
}


def _family(kind: str) -> str:
    return "normal" if "normal" in kind.lower() else "uniform"


def check_random_count(subs: Sequence[RandomSubgraph], draws: Sequence[Draw]) -> CheckResult:
    """Compares the train graph's random operators with the draws of PyTorch train mode.

    Args:
        subs: The train graph's random subgraphs, in graph order.
        draws: The random draws of one train-mode PyTorch forward, in call order.

    Returns:
        A result that fails when the counts differ or a pair is of different families.
    """
    mismatched = [
        f"{s.name} ({s.op}) vs {d.kind}"
        for s, d in zip(subs, draws)
        if _family(s.op) != _family(d.kind)
    ]
    same = len(subs) == len(draws) and not mismatched
    message = (
        f"train graph has {len(subs)} random operator(s); PyTorch train mode draws "
        f"{len(draws)} time(s) ({', '.join(sorted({d.kind for d in draws})) or 'none'})"
    )
    if mismatched:
        message += f"; of different kinds, in order: {mismatched[:3]}"
    if not same:
        message += "; stochastic depth (or another random draw) was lost, added or changed"
    return CheckResult(
        name="random_draw_count", passed=same, message=message, graph="train",
        details={"graph_ops": [s.op for s in subs], "pytorch_draws": [d.kind for d in draws]},
    )


def _probe(
    model: onnx.ModelProto, sub: RandomSubgraph, seed: float, known: dict | None = None
) -> onnx.ModelProto | str:
    """The subgraph drawing ``SAMPLES`` values at once, or why it cannot be cut out.

    ``known`` keeps the model's shape inference from one call to the next (a draw ``like`` a
    computed value, as torch.export's exporter writes stochastic depth, takes its dtype).
    """
    nodes, consts = model.graph.node, constant_values(model)
    source, rest = nodes[sub.index], [nodes[j] for j in sub.nodes[1:]]
    if source.op_type not in _DRAWN_AS:
        return f"{source.op_type} draws with data-dependent probabilities"
    odd = sorted({n.op_type for n in rest} - _ELEMENTWISE)
    if odd:
        return f"its mask is computed with {odd}, not element by element"
    made = {o for n in [source, *rest] for o in n.output}
    needed = sorted({i for n in rest for i in n.input if i and i not in made})
    missing = [i for i in needed if i not in consts]
    if missing:
        return f"its mask reads computed values {missing[:3]}"
    attrs = {a.name: helper.get_attribute_value(a) for a in source.attribute}
    dtype = attrs.get("dtype")
    if dtype is None and source.input:
        if source.input[0] in consts:
            dtype = helper.np_dtype_to_tensor_dtype(consts[source.input[0]].dtype)
        else:
            dtype = _inferred_elem_type(model, source.input[0], {} if known is None else known)
            if dtype is None:
                return "the dtype of its draw depends on a computed value"
    kept = {k: v for k, v in attrs.items() if k not in ("shape", "seed", "dtype")}
    draw = helper.make_node(
        _DRAWN_AS[source.op_type], [], list(source.output), shape=[SAMPLES], seed=float(seed),
        dtype=int(dtype or onnx.TensorProto.FLOAT), **kept,
    )
    graph = helper.make_graph(
        [draw, *rest], "random_probe", [],
        [helper.make_empty_tensor_value_info(m) for m in sub.masks],
        [numpy_helper.from_array(consts[i], i) for i in needed],
    )
    probe = helper.make_model(graph, opset_imports=list(model.opset_import))
    probe.ir_version = model.ir_version
    return probe


def _inferred_elem_type(model: onnx.ModelProto, name: str, known: dict) -> int | None:
    """The element type ONNX shape inference gives value ``name``, else None."""
    if "types" not in known:
        inferred = onnx.shape_inference.infer_shapes(model)
        g = inferred.graph
        known["types"] = {
            v.name: v.type.tensor_type.elem_type
            for v in [*g.input, *g.value_info, *g.output] if v.type.tensor_type.elem_type
        }
    return known["types"].get(name)


def _measure(sub: RandomSubgraph, p: float, random: list, fixed: list, base: CheckResult) -> None:
    """Fills ``base`` with the keep rate and the survivors' value of one probe run."""
    where = f"random subgraph '{sub.name}' ({sub.op})"
    problems, figures = [], {}
    n = SAMPLES
    bound = binomial_bound(n, p)
    for mask, y, y0 in zip(sub.masks, random, fixed):
        y, y0 = np.broadcast_arrays(np.asarray(y), np.asarray(y0))
        kept = (y == y0) & (y0 != 0)
        other = ~kept & (y != 0)
        k = int(kept.sum())
        scale = float(y0.flat[0]) if y0.size else math.nan
        figures[mask] = {"kept": k, "keep_rate": k / y.size, "survivor_value": scale}
        if other.any():
            problems.append(
                f"mask '{mask}' holds {int(other.sum())} value(s) other than 0 and the all-kept "
                f"value {scale:.6g} (e.g. {float(y[other].flat[0]):.6g})"
            )
        if abs(k - y.size * p) > bound:
            problems.append(
                f"mask '{mask}' kept {k}/{y.size} ({k / y.size:.4f}) vs PyTorch keep "
                f"probability {p:.4f} ± {bound:.0f}: outside the {SIGMAS:g}-sigma bound"
            )
    first = figures[sub.masks[0]] if sub.masks else {}
    base.passed = not problems and bool(sub.masks)
    base.details = {
        "keep_probability": p, "samples": n, "allowed_kept_deviation": bound, "sigmas": SIGMAS,
        "masks": figures, "conclusive": n * (1 - p) > bound,
    }
    if not sub.masks:
        base.message = f"{where}: its draw reaches no other node"
    elif problems:
        base.message = f"{where}: " + "; ".join(problems)
    else:
        inverse = f"1/keep_prob={1 / p:.6g}" if p > 0 else "keep_prob=0"
        base.message = (
            f"{where}: kept {first['kept']}/{n} ({first['keep_rate']:.4f}) vs PyTorch keep "
            f"probability {p:.4f} ± {bound:.0f}; survivors x{first['survivor_value']:.6g} "
            f"({inverse})"
        )


def check_random_rates(
    train: onnx.ModelProto,
    subs: Sequence[RandomSubgraph],
    draws: Sequence[Draw],
    seed: int,
) -> tuple[list[CheckResult], list[str]]:
    """Measures the keep rate of every random subgraph paired with a scalar Bernoulli draw.

    The probes run on CPU: they test the graph's wiring and constants, not a device's kernels.

    Args:
        train: The train graph.
        subs: Its random subgraphs, in graph order.
        draws: PyTorch's draws, in call order (paired with ``subs`` by position).
        seed: Seeds the probes' draws (each subgraph gets its own), for a reproducible report.

    Returns:
        One result per measured subgraph, and the names of subgraphs that could not be
        measured, each with the reason.
    """
    results, skipped, known = [], [], {}
    for i, (sub, drawn) in enumerate(zip(subs, draws)):
        if drawn.kind != "bernoulli" or drawn.p is None:
            skipped.append(f"{sub.name}: PyTorch's draw is {drawn.kind} without a scalar p")
            continue
        probe = _probe(train, sub, seed=float(seed * 7919 + i + 1), known=known)
        if isinstance(probe, str):
            skipped.append(f"{sub.name}: {probe}")
            continue
        base = CheckResult(
            name="random_draw_rate", passed=False, message="", graph="train", output=sub.name,
        )
        try:
            random_session = make_session(probe, "cpu", "train_random")
            fixed_session = make_session(deterministic_train_copy(probe), "cpu", "train_random")
            base.provider = random_session.provider
            random, fixed = random_session.run({}), fixed_session.run({})
        except (RunFailure, ValidationError) as e:  # a probe that will not run fails the check
            base.message = f"random subgraph '{sub.name}': its probe graph failed: {e}"
            results.append(base)
            continue
        _measure(sub, drawn.p, random, fixed, base)
        results.append(base)
    return results, skipped
