"""Validate an exported pair of graphs against the model and against each other.

Runs the checks DESIGN.md owes its users and gathers them into one
:class:`~graphtricks.onnx.report.ValidationReport`: inference graph vs eval mode, train graph
vs train mode (deterministic part, dropout count and statistics, stochastic depth count and
statistics), graph vs graph, provenance of every session, and no side effects on the model.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from graphtricks.collector import collector_paused
from graphtricks.errors import ValidationError
from graphtricks.io.inputs import MASK_INPUTS, VALUED_INPUTS, padded_masks
from graphtricks.onnx.checks.dropout import check_dropout_count, check_dropout_rates
from graphtricks.onnx.checks.graphs import (
    check_infer_has_no_train_ops,
    check_io,
    check_operators,
    check_weights,
    eager_eval_batch_statistics,
    eager_modes,
)
from graphtricks.onnx.checks.mc import check_mc_graph
from graphtricks.onnx.checks.numeric import (
    NOISE_FACTOR,
    check_infer_vs_eager,
    check_train_deterministic,
)
from graphtricks.onnx.checks.provenance import check_provenance
from graphtricks.onnx.checks.side_effects import check_no_side_effects
from graphtricks.onnx.checks.stochastic import check_random_count, check_random_rates
from graphtricks.onnx.draws import Draw
from graphtricks.onnx.eager import (
    ModelDigest,
    digest_model,
    float64_copy,
    reference_copy,
    torch_numerics,
)
from graphtricks.onnx.graph import (
    dropout_infos,
    exposed_dropout_copy,
    load_onnx_file,
    opset_of,
    train_mode_batchnorms,
)
from graphtricks.onnx.inputs import InputSet, as_input_tuple, random_like, session_feed
from graphtricks.onnx.names import INFER_FILE, MC_FILE, TRAIN_FILE, train_only_names
from graphtricks.onnx.portable import portable_dropouts
from graphtricks.onnx.report import CheckResult, ToleranceTable, ValidationReport
from graphtricks.onnx.runtime import (
    TRAIN_BN_DISABLED_OPTIMIZERS,
    Session,
    make_session,
    resolve_device,
)
from graphtricks.onnx.train_only import deterministic_train_copy, random_subgraphs
from graphtricks.onnx.weights import WeightTable, release_graph

__all__ = ["validate_pair"]


def _dynamic_sizes(infer: onnx.ModelProto, inputs: Sequence[torch.Tensor]) -> dict[tuple[int, int], int]:
    """Other sizes to try for every symbolic dimension of the graph inputs: ``(input, dim) ->
    size + 1``; dimensions sharing a symbol (a batch, a sequence length) take one size."""
    inits = {i.name for i in infer.graph.initializer}
    graph_inputs = [v for v in infer.graph.input if v.name not in inits]
    if len(graph_inputs) != len(inputs):
        return {}
    sizes: dict[tuple[int, int], int] = {}
    by_symbol: dict[str, int] = {}
    for i, (value, tensor) in enumerate(zip(graph_inputs, inputs)):
        for d, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") or d >= tensor.dim():
                continue
            symbol = dim.dim_param or f"{value.name}:{d}"
            sizes[(i, d)] = by_symbol.setdefault(symbol, int(tensor.shape[d]) + 1)
    return sizes


def _resized(inputs: Sequence[torch.Tensor], sizes: dict[tuple[int, int], int]) -> tuple[torch.Tensor, ...]:
    """The inputs grown along their dynamic dimensions, repeating their own values (so integer
    inputs keep their range, masks their form), as templates for :func:`random_like`."""
    out = []
    for i, t in enumerate(inputs):
        for (j, d), size in sizes.items():
            if j == i and t.shape[d]:
                reps = -(-size // t.shape[d])
                t = t.repeat(*[reps if k == d else 1 for k in range(t.dim())])
                t = t.narrow(d, 0, size)
        out.append(t)
    return tuple(out)


def _graph_input_names(infer: onnx.ModelProto) -> list[str]:
    """The inference graph's inputs, by name, in order (initializers listed as inputs aside)."""
    inits = {i.name for i in infer.graph.initializer}
    return [v.name for v in infer.graph.input if v.name not in inits]


def _by_position(given: Any, names: Sequence[str], index: int) -> Any:
    """An input set given by name (a mapping, an ``.npz``'s arrays) in the graphs' input order;
    anything else as it is (by position)."""
    if not isinstance(given, Mapping):
        return given
    unknown = [k for k in given if k not in names]
    missing = [n for n in names if n not in given]
    if unknown or missing:
        said = f"names {', '.join(map(str, unknown))} that no graph input has" if unknown else \
            f"no {', '.join(missing)}"
        raise ValidationError(
            f"extra input set {index} has {said}; the graphs take {', '.join(names)} "
            "(name the arrays after them, or give them unnamed in that order)"
        )
    return tuple(given[n] for n in names)


def _input_sets(
    inputs: tuple[torch.Tensor, ...],
    seeds: Sequence[int],
    extra: Sequence[tuple[torch.Tensor, ...]],
    sizes: dict[tuple[int, int], int],
    names: Sequence[str] = (),
) -> list[InputSet]:
    """One random set per seed (and with every dynamic dimension grown), then the user's sets.

    A set whose masks (``attention_mask``, ...) have padded positions says so in its label
    (``seed=0,padded=attention_mask``): the report shows that the padded case was checked.
    """

    def made(label: str, seed: int, templates: Sequence[torch.Tensor] = inputs) -> InputSet:
        tensors = random_like(templates, seed, None, names)
        padded = padded_masks(names, tensors)
        return InputSet(label + (f",padded={'+'.join(padded)}" if padded else ""), seed, tensors)

    sets = [made(f"seed={s}", s) for s in seeds]
    sets += [InputSet(f"extra_inputs[{i}]", None, x) for i, x in enumerate(extra)]
    if sizes and seeds:
        grown = _resized(inputs, sizes)
        shapes = ";".join("x".join(map(str, t.shape)) for t in grown)
        sets.append(made(f"seed={seeds[0]},shapes={shapes}", seeds[0], grown))
    return sets


def _valued_inputs_note(names: Sequence[str], input_sets: Sequence[InputSet], extra: bool) -> list[str]:
    """What the random sets gave the inputs named as Hugging Face names them, and what was padded."""
    valued = [n for n in names if n in VALUED_INPUTS]
    if not valued or not any(s.seed is not None for s in input_sets):
        return []
    padded = sorted({n for s in input_sets if s.seed is not None for n in padded_masks(names, s.tensors)})
    kinds = {"0/1 masks padded at the end of every row but the first": set(valued) & MASK_INPUTS,
             "segment ids 0 then 1": "token_type_ids" in valued, "positions 0, 1, 2, ...": "position_ids" in valued}
    return [
        f"input(s) {', '.join(valued)} named as Hugging Face names them: random sets give them valid "
        f"values ({', '.join(k for k, present in kinds.items() if present)})"
        + (f"; padded {', '.join(padded)} checked" if padded else "")
        + ("; the extra input sets are used as given" if extra else "")
    ]


def _random_checks(
    train: onnx.ModelProto, draws: Sequence[Draw], seeds: Sequence[int], report: ValidationReport
) -> list[CheckResult]:
    """Check 2c: stochastic depth's random operators, counted and measured (see check_stochastic).

    The probes run on CPU whatever the device: they test the graph's wiring and constants.
    """
    subs = random_subgraphs(train)
    results = [check_random_count(subs, draws)]
    if not subs:
        return results
    rates, skipped = check_random_rates(train, subs, draws, seed=seeds[0] if seeds else 0)
    if skipped:
        report.notes.append(f"random subgraph(s) not measured statistically: {skipped[:5]}")
    weak = [r.output for r in rates if r.details.get("conclusive") is False]
    if weak:
        report.notes.append(
            f"random subgraph(s) {weak[:5]} drop too rarely for the keep-rate test to tell one "
            "that never drops apart"
        )
    return results + rates


class _Float64Twin:
    """Makes, on first call, the float64 copy of the model on ``device`` that float32 errors are
    judged by, or None (noted in the report).

    Made only when an output fails the fixed tolerance (``checks.numeric``): a copy, and a float64
    run, of a large model cost more than the rest of its validation.
    """

    def __init__(self, model: nn.Module, device: str, report: ValidationReport) -> None:
        self.model, self.device, self.report = model, device, report
        self.tried, self.twin = False, None

    def __call__(self) -> nn.Module | None:
        if not self.tried:
            self.tried = True
            try:
                self.twin = float64_copy(self.model, train=False, device=self.device)
            except Exception as e:  # noqa: BLE001 -- a model that cannot be copied or converted: fixed tolerances only
                self.report.notes.append(
                    f"no float64 reference ({type(e).__name__}: {e}); outputs judged by atol/rtol only"
                )
        return self.twin

    @property
    def failed(self) -> bool:
        """Whether the copy was needed and could not be made."""
        return self.tried and self.twin is None


def validate_pair(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    onnx_dir: Path | str,
    *,
    device: str = "auto",
    atol: float | None = None,
    rtol: float | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    extra_inputs: Sequence[tuple[torch.Tensor, ...] | Mapping[str, torch.Tensor]] | None = None,
    baseline: ModelDigest | None = None,
    progress: Callable[[str], None] | None = None,
) -> ValidationReport:
    """Checks ``onnx_dir/model.{train,infer}.onnx`` against ``model`` and against each other.

    Where the folder also holds ``model.mc.onnx`` (MC dropout), it is checked as graph ``mc``
    (:mod:`graphtricks.onnx.checks.mc`).

    Args:
        model: The model the graphs were exported from; it is not changed.
        example_inputs: The example inputs of the export: random inputs copy their shapes and
            dtypes (integer inputs are drawn in ``[0, max(example) + 1)``).
        onnx_dir: The folder :func:`~graphtricks.onnx.export_pair` wrote.
        device: ``"auto"`` (CUDA when onnxruntime-gpu and a GPU are present), ``"cpu"`` or
            ``"cuda"`` (an error when unavailable or when ONNX Runtime falls back to CPU).
        atol: Absolute tolerance for floating-point outputs; by dtype and device when None.
        rtol: Relative tolerance for floating-point outputs; by dtype and device when None.
        seeds: One random input set per seed.
        extra_inputs: More input sets to compare on, e.g. real data: each a tuple in the graphs'
            input order, or a mapping by input name (``{"input_ids": ..., "attention_mask": ...}``).
        baseline: A snapshot taken before export, so the side-effect check covers it too.
        progress: called with a line as each of the check families starts
            (``"validating: random draws (step 3/6)"``).

    Returns:
        The report; ``report.passed`` tells whether every check passed.

    Raises:
        ValidationError: A file is missing or truncated, the device is unavailable, or inputs
            do not fit the graphs (wrong number, dtype or shape).

    Example:
        >>> report = validate_pair(model, (torch.randn(2, 3, 32, 32),), Path("out"), device="cpu")
        >>> report.passed
        True
    """
    start = time.perf_counter()
    inputs = as_input_tuple(example_inputs, "example_inputs", ValidationError)
    seeds = list(seeds)
    integers = all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    if not integers or not (seeds or extra_inputs):
        raise ValidationError(
            f"seeds must be integers, and seeds or extra_inputs non-empty; got {seeds!r}"
        )
    onnx_dir = Path(onnx_dir)
    with collector_paused(), WeightTable() as table:  # memory maps of the data file, shared by both graphs
        train = load_onnx_file(onnx_dir / TRAIN_FILE, "train", table)
        infer = load_onnx_file(onnx_dir / INFER_FILE, "inference", table)
        mc = load_onnx_file(onnx_dir / MC_FILE, "MC-dropout", table) if (onnx_dir / MC_FILE).exists() else None
        names = _graph_input_names(infer)
        extra = [
            as_input_tuple(_by_position(x, names, i), f"extra_inputs[{i}]", ValidationError)
            for i, x in enumerate(extra_inputs or [])
        ]
        report = _validate_loaded(
            model, inputs, train, infer, device, atol, rtol, seeds, extra, baseline, progress, mc
        )
    report.seconds = time.perf_counter() - start
    return report


# the check families, in the order they run (for progress lines)
_STEPS = ("inference graph vs PyTorch eval", "train graph vs PyTorch train", "random draws", "dropout count",
          "dropout keep-rates", "graph structure, providers, side effects")


def _input_sets_with_notes(
    report: ValidationReport, train: onnx.ModelProto, infer: onnx.ModelProto, inputs: tuple[torch.Tensor, ...],
    seeds: list[int], extra: list[tuple[torch.Tensor, ...]],
) -> list[InputSet]:
    """The input sets to validate on (seeded, given, at other sizes of dynamic dimensions), noted."""
    sizes = _dynamic_sizes(infer, inputs)
    names = _graph_input_names(infer)
    if sizes:
        dims = ", ".join(f"{names[i]}:{d} at {n}" for (i, d), n in sizes.items())
        report.notes.append(f"dynamic dimensions: also validated with {dims}")
    input_sets = _input_sets(inputs, seeds, extra, sizes, names)
    report.notes += _valued_inputs_note(names, input_sets, bool(extra))
    only_train = train_only_names([o.name for o in train.graph.output])
    if only_train:
        report.notes.append(
            f"train-only output(s) {', '.join(only_train)}: the model returns them in train mode "
            "only; they are compared with PyTorch train mode, the outputs both graphs have with "
            "both modes"
        )
    return input_sets


def _train_graph_sessions(train: onnx.ModelProto, asked: str, report: ValidationReport) -> tuple[str, tuple[str, ...]]:
    """Where the train graph runs and which ONNX Runtime optimizers its sessions turn off, noted."""
    train_device, bns = asked, train_mode_batchnorms(train)
    if asked == "cuda" and bns and opset_of(train) >= 14:
        train_device = "cpu"
        report.notes.append(
            f"the train graph has {len(bns)} BatchNormalization node(s) with training_mode=1, "
            "which ONNX Runtime's CUDA provider refuses at opset >= 14 (onnxruntime#16867): "
            "train-graph checks ran on CPUExecutionProvider, against PyTorch train mode on CPU"
        )
    disabled: tuple[str, ...] = ()
    if bns:
        disabled = TRAIN_BN_DISABLED_OPTIMIZERS
        report.notes.append(
            f"train-graph sessions ran with disabled_optimizers={list(disabled)}: with it, ONNX "
            "Runtime merges equal initializers and train-mode BatchNormalization then overwrites "
            "its scale (onnxruntime#29790); run the train graph the same way"
        )
    return train_device, disabled


def _dropout_checks(
    train: onnx.ModelProto, input_sets: list[InputSet], eager_ps: list[float],
    where: tuple[str, bool, tuple[str, ...]], report: ValidationReport, sessions: list[Session],
    step: Callable[[], None],
) -> None:
    """Dropout count, then keep-rates and scales measured on every mask (a session of its own)."""
    train_device, strict, disabled = where
    step()
    portable = portable_dropouts(train)
    infos = dropout_infos(train) + portable
    report.checks.append(check_dropout_count(infos, eager_ps))
    rates = []
    step()
    if infos:
        # One session for every input set: a seeded Dropout moves its generator on at every
        # run (on CPU the run after seed s draws with s + 1), so each input set gets new
        # masks and the report is reproducible. ORT seeds 0 and 1 give the same masks (an
        # LCG maps seed 0 to 1): keep seeds >= 1.
        first = input_sets[0].seed
        node_seed = 1 + (first if first is not None else 1_000_003) % (2**31 - 2)
        exposed = exposed_dropout_copy(train, seed=node_seed, portable=portable)
        sessions.append(make_session(exposed, train_device, "train_dropout", strict, disabled))
        rates = check_dropout_rates(sessions[-1], infos, input_sets)
    report.checks += rates
    if infos:
        weak = sorted({str(r.output) for r in rates if r.details.get("conclusive") is False})
        if weak:
            report.notes.append(
                f"Dropout node(s) {weak} see too few non-zero elements for the keep-rate test "
                "to tell an inert dropout apart; validate with larger inputs"
            )


def _validate_loaded(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    train: onnx.ModelProto,
    infer: onnx.ModelProto,
    device: str,
    atol: float | None,
    rtol: float | None,
    seeds: list[int],
    extra: list[tuple[torch.Tensor, ...]],
    baseline: ModelDigest | None,
    progress: Callable[[str], None] | None = None,
    mc: onnx.ModelProto | None = None,
) -> ValidationReport:
    """:func:`validate_pair` on graphs already loaded (their weights held by a table)."""
    stages = _STEPS[:1] + (("MC-dropout graph",) if mc is not None else ()) + _STEPS[1:]
    steps, total = iter(enumerate(stages, 1)), len(stages)

    def step() -> None:
        i, what = next(steps)
        if progress is not None:
            progress(f"validating: {what} (step {i}/{total})")  # steps, not the check families

    asked = resolve_device(device)
    strict = device == "cuda"
    before = baseline if baseline is not None else digest_model(model)
    report = ValidationReport(device=asked, seeds=seeds)
    tolerance = ToleranceTable(asked, atol, rtol)
    input_sets = _input_sets_with_notes(report, train, infer, inputs, seeds, extra)

    train_device, disabled = _train_graph_sessions(train, asked, report)
    sessions: list[Session] = []
    with torch_numerics(asked):
        sessions.append(make_session(infer, asked, "infer", strict))
        for input_set in input_sets:  # wrong inputs are the user's error: say so before any run
            session_feed(sessions[-1].inner, input_set.tensors, input_set.label)
        # One copy serves both modes: eval-mode runs leave it as it was.
        step()
        reference = reference_copy(model, train=False, device=sessions[-1].device)
        truths = [_Float64Twin(model, sessions[-1].device, report)]
        report.checks += check_infer_vs_eager(
            sessions[-1], model, input_sets, tolerance, reference, truths[0]
        )
        if mc is not None:  # before the train checks: their train-mode runs move the copy's running statistics
            step()
            found, made, notes = check_mc_graph(
                model, mc, infer, inputs, input_sets, asked, tolerance, reference=reference,
                truth=truths[0], strict=strict,
            )
            report.checks += found
            report.notes += notes
            sessions += made
            release_graph(mc)
        release_graph(infer)  # its file's weights leave memory before the train graph's come in

        step()
        neutral = deterministic_train_copy(train)
        sessions.append(
            make_session(neutral, train_device, "train_deterministic", strict, disabled)
        )
        if train_device != sessions[0].device:
            truths.append(_Float64Twin(model, train_device, report))
        deterministic, eager_ps, draws = check_train_deterministic(
            sessions[-1], model, input_sets, tolerance, reference, truths[-1]
        )
        report.checks += deterministic
        step()
        report.checks += _random_checks(train, draws, seeds, report)

        _dropout_checks(train, input_sets, eager_ps, (train_device, strict, disabled), report, sessions, step)

    step()
    # A model whose own forward differs by mode (beyond dropout/BatchNorm) explains a difference
    # in operator counts or weights; its eager forwards run only when one differs, once for both.
    modes = functools.cache(lambda: eager_modes(model, inputs, device=asked))
    report.checks += [
        check_io(train, infer),
        check_weights(train, infer, modes),
        check_operators(train, infer, lambda: modes().call_difference()),
        check_infer_has_no_train_ops(
            infer, lambda: eager_eval_batch_statistics(model, inputs, device=asked)
        ),
        check_provenance(sessions),
        check_no_side_effects(before, model),
    ]
    report.providers = {s.role: s.providers for s in sessions}
    report.tolerances = dict(tolerance.used)
    if not any(t.failed for t in truths):
        report.tolerances["float64_reference"] = {"noise_factor": NOISE_FACTOR}
    return report
