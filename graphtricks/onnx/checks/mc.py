"""Check 6: the MC-dropout graph (``model.mc.onnx``): every dropout on, everything else as in eval.

An MC graph is sampled T times and its spread read as uncertainty (``gt.mc_sample``), so it must
be the inference graph plus dropout, and nothing of train mode besides:

- ``mc_vs_eager``: with every dropout neutralised (and every random draw fixed, as for the train
  graph) it equals PyTorch eval mode, output by output (check 1's comparison and tolerances);
- ``dropout_count`` and ``dropout_rate`` (graph ``mc``): as many active dropouts as PyTorch
  applies in eval mode with every dropout forced on, each measured on its mask: keep rate
  within the binomial bound of 1 − p, survivors × 1/(1 − p), output = data × mask (check 2b);
- ``mc_fresh_masks``: two runs of one default session draw different masks (a seeded or
  constant-folded draw would make every "sample" the same);
- ``mc_batch_independent``: a sample's output does not depend on the other samples in its batch
  — the test that tells an MC graph from a train graph, whose BatchNorm uses batch statistics;
- ``mc_eval_elsewhere``: no train-mode BatchNorm, no ``updated.*`` running statistics, no
  train-only outputs;
- ``mc_same_io`` / ``mc_same_weights``: the inference graph's inputs, outputs and weights.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn

from graphtricks.errors import ValidationError
from graphtricks.onnx.checks.dropout import check_dropout_count, check_dropout_rates
from graphtricks.onnx.checks.graphs import check_io, check_weights
from graphtricks.onnx.checks.numeric import check_infer_vs_eager, compare_output
from graphtricks.onnx.eager import DropoutInterceptor
from graphtricks.onnx.graph import exposed_dropout_copy, train_mode_batchnorms
from graphtricks.onnx.inputs import InputSet, random_like, session_feed
from graphtricks.onnx.names import TRAIN_ONLY_PREFIX
from graphtricks.onnx.portable import BN_TAG, UPDATED_PREFIX, portable_dropouts
from graphtricks.onnx.report import CheckResult, Tolerance
from graphtricks.onnx.runtime import RunFailure, Session, make_session
from graphtricks.onnx.train_only import deterministic_train_copy

__all__ = [
    "MC_GRAPH",
    "check_mc_batch_independent",
    "check_mc_eval_elsewhere",
    "check_mc_fresh_masks",
    "check_mc_graph",
    "check_mc_same_io_and_weights",
    "eager_forced_dropouts",
    "masks_exposed_copy",
]

MC_GRAPH = "mc"
# Chance two independent masks of one dropout come out equal, below which "equal twice" is a defect.
_SAME_MASK_CHANCE = 1e-9


def eager_forced_dropouts(reference: nn.Module, inputs: Sequence[torch.Tensor], device: str) -> list[float]:
    """The drop probability of every dropout one eval-mode forward applies with dropout forced on."""
    reference.eval()
    interceptor = DropoutInterceptor(neutralise=False, force=True)
    with torch.no_grad(), interceptor:
        reference(*[t.to(device) for t in inputs])
    return interceptor.calls


def check_mc_eval_elsewhere(mc: onnx.ModelProto) -> CheckResult:
    """No train-mode BatchNorm (ONNX or portable), no running-statistics or train-only outputs."""
    problems = []
    bns = train_mode_batchnorms(mc)
    if bns:
        problems.append(f"{len(bns)} BatchNormalization node(s) with training_mode=1")
    portable = sorted({n.name.split(".")[2] for n in mc.graph.node if n.name.startswith(BN_TAG)})
    if portable:
        problems.append(f"{len(portable)} BatchNorm(s) on batch statistics ({BN_TAG}*)")
    extra = [o.name for o in mc.graph.output if o.name.startswith((UPDATED_PREFIX, TRAIN_ONLY_PREFIX))]
    if extra:
        problems.append(f"train-mode outputs {extra[:5]}")
    message = ("; ".join(problems) + ": the MC graph must run every module but dropout as in eval"
               if problems else "no train-mode BatchNorm, running statistics or train-only outputs")
    return CheckResult(name="mc_eval_elsewhere", passed=not problems, graph=MC_GRAPH, message=message,
                       details={"train_batchnorms": len(bns), "portable_batchnorms": portable, "extra_outputs": extra})


def _dims(model: onnx.ModelProto) -> dict[str, list]:
    """Each graph input's and output's dimensions: a size, a symbol's name, or None (unknown)."""
    inits = {i.name for i in model.graph.initializer}
    values = [v for v in model.graph.input if v.name not in inits] + list(model.graph.output)
    return {v.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in v.type.tensor_type.shape.dim] for v in values}


def _fixed_differently(mc: onnx.ModelProto, infer: onnx.ModelProto) -> list[str]:
    """Dimensions fixed in one graph and symbolic or another size in the other, one phrase each."""
    theirs, out = _dims(infer), []
    for name, dims in _dims(mc).items():
        for d, (a, b) in enumerate(zip(dims, theirs.get(name, []))):
            if a is not None and b is not None and a != b and (isinstance(a, int) or isinstance(b, int)):
                out.append(f"'{name}' dim {d}: {a} in the MC graph, {b} in the inference graph")
    return out


def check_mc_same_io_and_weights(mc: onnx.ModelProto, infer: onnx.ModelProto) -> list[CheckResult]:
    """The inference graph's inputs, outputs (and their fixed and symbolic dimensions) and weights
    (check 3's comparisons, as graph ``mc``)."""
    out = []
    for check, name in ((check_io, "mc_same_io"), (check_weights, "mc_same_weights")):
        result = check(mc, infer)
        result.name, result.graph = name, MC_GRAPH
        result.message = re.sub(r"\btrain\b", "mc", result.message)
        out.append(result)
    differing = _fixed_differently(mc, infer)
    if differing:
        io = out[0]
        io.passed = False
        io.message = ("dimensions differ: " + "; ".join(differing[:4]) + "; export both graphs with the same "
                      "dynamic dimensions" + ("" if io.message.startswith("same") else f"; {io.message}"))
        io.details["dimensions"] = differing
    return out


def masks_exposed_copy(mc: onnx.ModelProto, masks: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``mc`` that also outputs each mask, its draws left unseeded (as users run it)."""
    out = copy.deepcopy(mc)
    present = {o.name for o in out.graph.output}
    out.graph.output.extend(helper.make_empty_tensor_value_info(m) for m in masks if m not in present)
    return out


def check_mc_fresh_masks(session: Session, masks: Sequence[str], ratios: Sequence[float | None],
                         input_set: InputSet) -> list[CheckResult]:
    """Two runs of one session on the same inputs: each dropout's mask must differ between them.

    Args:
        session: A session of :func:`masks_exposed_copy` of the MC graph (draws unseeded).
        masks: The mask value of each dropout. ratios: their drop probabilities.
        input_set: The inputs of both runs.
    """
    feed = session_feed(session.inner, input_set.tensors, input_set.label)
    try:
        first = dict(zip(session.output_names, session.run(feed)))
        second = dict(zip(session.output_names, session.run(feed)))
    except RunFailure as e:
        return [CheckResult(name="mc_fresh_masks", passed=False, graph=MC_GRAPH, provider=session.provider,
                            inputs=input_set.label, message=f"mc graph on {input_set.label}: {e}")]
    results = []
    for mask, p in zip(masks, ratios):
        a, b = first[mask], second[mask]
        same = bool(np.array_equal(a, b))
        q = p if p is not None else 0.5
        chance = float(np.exp(a.size * np.log(max(q * q + (1 - q) * (1 - q), 1e-300))))
        conclusive = chance < _SAME_MASK_CHANCE
        passed = not same or not conclusive
        where = f"mc dropout mask '{mask}' on {input_set.label}"
        message = (f"{where}: two runs of one session drew the same {a.size}-element mask: the draw is seeded "
                   "or folded into a constant, so every MC sample is the same" if not passed else
                   f"{where}: {int(np.count_nonzero(a != b))}/{a.size} elements differ between two runs"
                   + ("" if conclusive else " (too few elements to tell a fixed mask apart)"))
        results.append(CheckResult(name="mc_fresh_masks", passed=passed, graph=MC_GRAPH, provider=session.provider,
                                   output=mask, seed=input_set.seed, inputs=input_set.label, message=message,
                                   details={"elements": int(a.size), "same": same, "conclusive": conclusive}))
    return results


def _others_replaced(tensors: Sequence[torch.Tensor], seed: int) -> tuple[torch.Tensor, ...]:
    """``tensors`` with every row but the first drawn anew (rank-0 inputs kept)."""
    fresh = random_like(tensors, seed)
    return tuple(torch.cat([t[:1], f[1:]]) if t.ndim else t for t, f in zip(tensors, fresh))


def check_mc_batch_independent(
    session: Session, inputs: Sequence[torch.Tensor], seed: int, batch: int | None,
    tolerance: Callable[[torch.dtype], Tolerance],
) -> CheckResult:
    """A sample's output must not depend on the other samples of its batch (BatchNorm on running statistics).

    Runs the MC graph with its dropouts neutralised on a batch, then on the same batch with every
    row but the first drawn anew: the first row of every output must not move (beyond float
    noise). A train-mode BatchNorm normalises with the batch's statistics and fails.

    Args:
        session: A session of the MC graph's deterministic copy.
        inputs: The example inputs (their shapes and dtypes).
        seed: Seeds the random batch. batch: a batch size of at least 2 to use when the graph's
            batch dimension is symbolic and the examples hold one row (None: the examples' size).
        tolerance: Gives the tolerance of an output dtype.
    """
    base = random_like(inputs, seed, batch)
    rows = next((int(t.shape[0]) for t in base if t.ndim), 0)
    result = CheckResult(name="mc_batch_independent", passed=False, graph=MC_GRAPH, provider=session.provider,
                         seed=seed, inputs=f"seed={seed}", message="")
    if rows < 2:
        result.passed = True
        result.message = ("batch of one row and a fixed batch dimension: no other sample to depend on "
                          "(export with a batch of 2 or more, or a dynamic batch, to test it)")
        result.details = {"conclusive": False}
        return result
    other = _others_replaced(base, seed + 7919)
    try:
        first = session.run(session_feed(session.inner, base, result.inputs))
        second = session.run(session_feed(session.inner, other, result.inputs))
    except RunFailure as e:
        result.message = f"mc graph on {result.inputs}: {e}"
        return result
    worst = None
    for name, a, b in zip(session.output_names, first, second):
        if not np.asarray(a).ndim:
            continue
        reference = torch.from_numpy(np.ascontiguousarray(a[:1]))
        probe = CheckResult(name="mc_batch_independent", passed=False, message="", graph=MC_GRAPH, output=name)
        compare_output(np.asarray(b[:1]), reference, tolerance(reference.dtype), probe)
        if not probe.passed and worst is None:
            worst = (name, probe)
        result.max_abs = max(result.max_abs or 0.0, probe.max_abs or 0.0)
    result.passed = worst is None
    result.message = (f"output '{worst[0]}' of sample 0 changes by up to {worst[1].max_abs:.3g} when the other "
                      f"{rows - 1} sample(s) of its batch change: a BatchNorm (or other layer) uses batch "
                      "statistics, as in a train graph" if worst else
                      f"sample 0's outputs unchanged (max abs {result.max_abs or 0:.3g}) when the other "
                      f"{rows - 1} sample(s) of its batch change")
    result.details = {"batch": rows, "conclusive": True}
    return result


def _symbolic_batch(model: onnx.ModelProto) -> bool:
    """Whether dimension 0 of every ranked graph input is symbolic."""
    dims = [d for name, d in _dims(model).items() if name not in {o.name for o in model.graph.output} and d]
    return bool(dims) and all(not isinstance(d[0], int) for d in dims)


def _taken(session: Session, input_sets: Sequence[InputSet]) -> list[InputSet]:
    """The input sets the session's graph accepts (names, dtypes, fixed dimensions)."""
    taken = []
    for input_set in input_sets:
        try:
            session_feed(session.inner, input_set.tensors, input_set.label)
        except ValidationError:
            continue
        taken.append(input_set)
    return taken


def check_mc_graph(
    model: nn.Module,
    mc: onnx.ModelProto,
    infer: onnx.ModelProto,
    inputs: Sequence[torch.Tensor],
    input_sets: Sequence[InputSet],
    device: str,
    tolerance: Callable[[torch.dtype], Tolerance],
    *,
    reference: nn.Module,
    truth: Callable[[], nn.Module | None] | None = None,
    strict: bool = False,
) -> tuple[list[CheckResult], list[Session], list[str]]:
    """Every check of the MC graph (see the module docstring).

    Args:
        model: The PyTorch model the graphs were exported from (not changed: ``reference`` runs).
        mc: The MC graph. infer: The inference graph.
        inputs: The example inputs. input_sets: The input sets of the other checks.
        device: Where the sessions run (resolved). tolerance: Gives the tolerance of an output dtype.
        reference: A copy of ``model`` (:func:`~graphtricks.onnx.eager.reference_copy`), run in eval mode.
        truth: Gives a float64 copy of the model in eval mode (see check 1), or None.
        strict: Raise when CUDA was asked and a session fell back to CPU.

    Returns:
        The results, the sessions made (for the provenance check) and notes for the report.
    """
    results: list[CheckResult] = [check_mc_eval_elsewhere(mc), *check_mc_same_io_and_weights(mc, infer)]
    sessions = [make_session(deterministic_train_copy(mc), device, "mc_deterministic", strict)]
    notes = []
    taken = _taken(sessions[0], input_sets)
    if len(taken) < len(input_sets):
        skipped = [s.label for s in input_sets if s not in taken]
        notes.append(f"the MC graph does not take input set(s) {skipped} that the inference graph takes "
                     "(see mc_same_io); its checks ran on the others")
    if not taken:
        return results, sessions, notes
    input_sets = taken
    results += [r for r in check_infer_vs_eager(sessions[0], model, input_sets, tolerance, reference, truth,
                                                graph=MC_GRAPH) if r.name == "mc_vs_eager"]
    seed = input_sets[0].seed if input_sets and input_sets[0].seed is not None else 0
    rows = next((int(t.shape[0]) for t in inputs if t.ndim), 0)
    grown = 2 if rows < 2 and _symbolic_batch(mc) else None  # one example: a batch of two where the graph takes it
    results.append(check_mc_batch_independent(sessions[0], inputs, seed, grown, tolerance))
    infos = portable_dropouts(mc)
    results.append(check_dropout_count(infos, eager_forced_dropouts(reference, inputs, device), graph=MC_GRAPH))
    if not infos:
        notes.append("the MC graph has no dropout: its samples are all the same")
        return results, sessions, notes
    node_seed = 1 + seed % (2**31 - 2)  # seeds ≥ 1: ORT maps seed 0 to 1
    exposed = exposed_dropout_copy(mc, seed=node_seed, portable=infos)
    sessions.append(make_session(exposed, device, "mc_dropout", strict))
    rates = check_dropout_rates(sessions[-1], infos, input_sets, graph=MC_GRAPH)
    results += rates
    weak = sorted({str(r.output) for r in rates if r.details.get("conclusive") is False})
    if weak:
        notes.append(f"MC dropout(s) {weak} see too few elements for the keep-rate test to tell an inert "
                     "dropout apart; validate with larger inputs")
    sessions.append(make_session(masks_exposed_copy(mc, [i.mask for i in infos]), device, "mc", strict))
    results += check_mc_fresh_masks(sessions[-1], [i.mask for i in infos], [i.ratio for i in infos], input_sets[0])
    return results, sessions, notes
