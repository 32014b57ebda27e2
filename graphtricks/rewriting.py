"""Rewrite: capture a model, run a list of passes over every region, report what changed."""

from __future__ import annotations

import contextlib
import copy
import inspect
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphtricks.capturing import RegionTree, capture
from graphtricks.capturing.fold import fold_region
from graphtricks.capturing.modes import ModeSnapshot, adopt_parent_modes
from graphtricks.capturing.shapes import propagate_shapes
from graphtricks.capturing.transaction import ModelSnapshot
from graphtricks.collector import collector_paused
from graphtricks.errors import GraphtricksError, InputShapeError, PassError
from graphtricks.fxgraph.fastpath import speed_up
from graphtricks.passes.base import (
    GraphtricksPass,
    NoChangeWarning,
    PassNoteWarning,
    PassRun,
    SelectionNames,
    SelectionWarning,
)
from graphtricks.report import Report

__all__ = ["rewrite", "RewriteResult", "model_structure"]


@dataclass
class RewriteResult:
    """The rewritten model, what was done to it, and its region tree.

    Attributes:
        model: the rewritten ``nn.Module`` (an ordinary module: train it, save it, export it).
        report: every change, warning and the region tree.
        tree: the region tree of ``model`` (traced graphs and opaque modules).
        passes: the passes that were run, in order (their configs form the recipe).
        example_inputs: the positional inputs used for capture and shapes.
        runs: one :class:`PassRun` per pass, in order: what each application changed and noted.
        given: the structure of the model the rewrite was given (:func:`model_structure`), for
            ``save`` to check that the source it is told rebuilds that model.
    """

    model: nn.Module
    report: Report
    tree: RegionTree
    passes: list[GraphtricksPass]
    example_inputs: tuple
    runs: list[PassRun] = field(default_factory=list)
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    given: dict[str, Any] | None = None

    def __repr__(self) -> str:
        # a few lines, not the model twice (the dataclass repr printed the model and its tree)
        passes = ", ".join(map(repr, self.passes)) or "none"
        return (f"RewriteResult(model={type(self.model).__name__},\n  passes=[{passes}],\n"
                f"  report={self.report!r},\n  tree={self.tree!r})")

    def recipe(self) -> list[dict[str, Any]]:
        """The pass list as recipe entries (``[{"pass": "dropout", "p": 0.1, ...}]``)."""
        return [p.config() for p in self.passes]


def model_structure(model: nn.Module) -> dict[str, dict[str, Any]]:
    """What a rebuild of ``model`` must reproduce: the type of every leaf module by name, and the
    shape of every state-dict entry by key (``None`` for a lazy parameter, whose shape is not known yet).
    """
    leaves = {name: type(m).__name__ for name, m in model.named_modules() if next(m.children(), None) is None}
    shapes = {key: None if isinstance(t, nn.parameter.UninitializedTensorMixin) else list(getattr(t, "shape", ()))
              for key, t in model.state_dict(keep_vars=True).items()}
    return {"leaves": leaves, "shapes": shapes}


def _as_inputs(example_inputs: Any, example_kwargs: Any) -> tuple[tuple, dict[str, Any]]:
    """The positional and keyword example inputs, checked (at least one input in all)."""
    if example_kwargs is None:
        example_kwargs = {}
    if not isinstance(example_kwargs, dict) or not all(isinstance(k, str) for k in example_kwargs):
        raise InputShapeError("example_kwargs must be a dict of the model's keyword inputs by name,"
                              f" got {type(example_kwargs).__name__}")
    if example_inputs is None:
        example_inputs = ()
    if isinstance(example_inputs, dict):
        raise InputShapeError("example_inputs holds positional inputs; pass keyword inputs as example_kwargs={...}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    elif isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple) or not (example_inputs or example_kwargs):
        raise InputShapeError("example_inputs must be a tensor or a non-empty tuple of the model's positional inputs"
                              " (or give its keyword inputs as example_kwargs={...})")
    return example_inputs, dict(example_kwargs)


def _check_binds(model: nn.Module, inputs: tuple, kwargs: dict[str, Any]) -> None:
    """Raise a one-line error when the forward's signature cannot take these inputs."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return  # no signature to check against: the forward itself will say
    try:
        sig.bind(*inputs, **kwargs)
    except TypeError as e:
        raise InputShapeError(f"the example inputs do not fit {type(model).__name__}.forward{sig}: {e}") from e


def _as_passes(passes: Any) -> list[GraphtricksPass]:
    """One pass or a list of passes, as a list; anything else is a one-line error."""
    if isinstance(passes, GraphtricksPass):
        return [passes]
    if isinstance(passes, type) and issubclass(passes, GraphtricksPass):
        raise PassError(f"{passes.__name__} is a pass class: give an instance, e.g. {passes.__name__}()")
    if passes is None or isinstance(passes, (str, bytes, dict, nn.Module)) or not hasattr(passes, "__iter__"):
        raise PassError(f"passes must be a pass or a list of passes (e.g. [InsertDropout(p=0.1)]), got {_kind(passes)}")
    out = list(passes)
    for i, p in enumerate(out):
        if not isinstance(p, GraphtricksPass):
            raise PassError(f"passes[{i}] is not a graphtricks pass but {_kind(p)} (build passes like InsertDropout(p=0.1))")
    return out


def _kind(value: Any) -> str:
    """A short description of a value for an error message (its type, and its repr when short)."""
    text = repr(value)
    return f"{type(value).__name__} {text}" if len(text) <= 60 else f"a {type(value).__name__}"


def _check_model(model: Any) -> None:
    """Refuse anything but a module, in one line."""
    if isinstance(model, nn.Module):
        return
    hint = ("; call it to build the model first" if isinstance(model, type) and issubclass(model, nn.Module)
            else " (a function or a value cannot be rewritten: wrap it in an nn.Module)")
    raise GraphtricksError(f"rewrite takes a torch.nn.Module, got {_kind(model)}{hint}")


def rewrite(
    model: nn.Module,
    passes: GraphtricksPass | Sequence[GraphtricksPass],
    example_inputs: Any = (),
    *,
    example_kwargs: dict[str, Any] | None = None,
    inplace: bool = False,
    progress: Callable[[str], None] | None = None,
) -> RewriteResult:
    """Capture ``model``, apply ``passes`` in order to every region, and report each edit.

    The caller's model is not modified unless ``inplace=True``, and its train/eval mode is
    restored even when a pass fails. An in-place rewrite is a transaction: when anything fails
    (a pass, the fold, the install), the model is put back exactly as it was — class, modules,
    parameters (the same objects), buffers, modes, hooks and forwards — without a copy of its
    weights (only parameters a pass writes in place, e.g. ``Initialize``'s, are copied first).
    A pass that matches nothing warns (``NoChangeWarning``) and the rewrite still returns the
    (unchanged) model; a selection pattern that matches no name of the model is an error
    (``SelectionError``; a ``SelectionWarning`` for a pass built with ``strict=False``).

    Args:
        model: the model to rewrite.
        passes: a pass, or a list of passes, e.g. ``[InsertDropout(p=0.1)]``.
        example_inputs: a tensor or tuple of the model's positional inputs (shapes come from it);
            ``()`` when every input is given by keyword.
        example_kwargs: the model's keyword inputs by name (``{"input_ids": ids, "attention_mask": m}``),
            bound to its forward's signature: the graph takes them as inputs like positional ones.
        inplace: edit ``model``'s modules instead of a deep copy (no memory for a copy).
        progress: called with a line at each stage (``"rewrite: pass dropout (3/4)"``), for
            long rewrites; the CLI prints it on stderr.

    Returns:
        A :class:`RewriteResult`.

    Raises:
        GraphtricksError: ``model`` is not an ``nn.Module``.
        InputShapeError: the model rejects the example inputs, or its forward cannot take them.
        PassError: ``passes`` holds something that is not a pass, or a pass is misconfigured or
            fails on this model (names the region); SelectionError: an include/exclude/block
            pattern matches nothing (names it and the closest names).

    Example:
        >>> result = rewrite(model, [InsertDropout(p=0.1)], example_inputs=(torch.randn(8, 3, 32, 32),))
        >>> result.model, result.report.changes
    """
    started = time.perf_counter()
    _check_model(model)
    passes = _as_passes(passes)
    inputs, kwargs = _as_inputs(example_inputs, example_kwargs)
    _check_binds(model, inputs, kwargs)
    with collector_paused():
        given = model_structure(model)
        # in place: a transaction, without copying the weights; values passes write wait for its end
        snapshot = ModelSnapshot(model) if inplace else None
        defer = inplace and any(p.writes_values for p in passes)
        try:
            result = _rewrite(model, passes, inputs, kwargs, inplace, started, progress or _silent, defer)
        except BaseException as e:
            _restore(snapshot, e)
            raise
        if defer:
            try:
                with _interrupts_held():  # Ctrl-C comes once every value is written
                    _write_deferred(result.runs)
            except Exception as e:  # noqa: BLE001 -- a write failed (out of memory): nothing half-done
                _restore(snapshot, e)
                raise
    result.given = given
    return result


def _restore(snapshot: ModelSnapshot | None, error: BaseException) -> None:
    """Puts an in-place rewrite's model back; says on ``error`` what could not be."""
    lost = snapshot.restore() if snapshot is not None else []
    if lost and hasattr(error, "add_note"):  # a pass wrote values not through write_values
        error.add_note(f"graphtricks: {len(lost)} tensor value(s) written in place could not be put back: "
                       + ", ".join(lost[:5]))


def _write_deferred(runs: list[PassRun]) -> None:
    """The parameter values the passes of an in-place rewrite set, written now, in pass order."""
    with torch.no_grad():
        for run in runs:
            writes, run.deferred = run.deferred or [], None
            for write in writes:
                write()


@contextlib.contextmanager
def _interrupts_held():
    """Holds Ctrl-C (SIGINT) back while the block runs, then delivers it: writing a rewrite's
    values is not left half-done. Only the main thread receives signals; elsewhere it does nothing."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # (None: a handler not installed from Python, which Python cannot put back)
        return
    caught: list[tuple] = []
    previous = signal.signal(signal.SIGINT, lambda *received: caught.append(received))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        if callable(previous):
            previous(*caught[0])
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt


def _silent(message: str) -> None:
    """No progress reporting."""


def _rewrite(model: nn.Module, passes: list, inputs: tuple, kwargs: dict, inplace: bool, started: float,
             progress: Callable[[str], None] = _silent, defer: bool = False) -> RewriteResult:
    snapshot = ModeSnapshot(model)
    try:
        try:
            work = model if inplace else copy.deepcopy(model)
        except Exception as e:
            raise GraphtricksError(f"cannot copy the model ({e}); pass inplace=True to rewrite it without a copy") from e
        steps = 2 + len(passes)  # each progress line ends with its step's count
        progress(f"rewrite: capturing the model, tracing in train and eval mode (1/{steps})")
        tree = capture(work, inputs, kwargs)
        progress(f"rewrite: recording shapes, one forward (2/{steps})")
        # One forward records shapes, and what passes measure, for as long as the model's eval
        # outputs stay as they are: passes record shapes on what they add.
        runs = [PassRun(tree, inputs, kwargs, deferred=[] if defer else None) for _ in passes]
        observers = []
        for p, run in zip(passes, runs):
            found = p.observe(run)
            if found is not None:
                observers.append(found)
            if not p.preserves_eval:
                break
        propagate_shapes(tree, inputs, observers, kwargs)
        known = {id(m) for m in tree.model.modules()}
        report = Report(passes=[p.config() for p in passes])
        stale = False
        names = SelectionNames(tree, now=any(p.selections() for p in passes))
        for i, (p, run) in enumerate(zip(passes, runs), 1):
            progress(f"rewrite: pass {p.name} ({i + 2}/{steps})")
            if stale:  # a pass built something no forward has measured yet
                propagate_shapes(tree, inputs, example_kwargs=kwargs)
            _run_pass(p, run, report)
            stale = run.stale_shapes
        # Once every pass has run: a pattern may name what a later pass built (the command line
        # gives its --include to every pass); strict passes raise, the others warn.
        for p in passes:
            for message in p.check_selections(names):
                warnings.warn(message, SelectionWarning, stacklevel=3)
                report.warnings.append(message)
    finally:
        snapshot.restore()
    adopt_parent_modes(tree.model, known)
    # Each module the trace went through gets its own graph back: blocks stay called modules.
    for region in tree.regions():
        if region.kind == "traced":
            fold_region(region)
            report.inlined.update(region.inlined)
    for module in tree.model.modules():  # fx's forward minus its per-call overhead (fastpath.py)
        if isinstance(module, fx.GraphModule):
            speed_up(module)
    report.regions = tree.root.to_dict()
    report.traced_fraction = tree.traced_fraction()
    report.seconds = time.perf_counter() - started
    return RewriteResult(tree.model, report, tree, list(passes), inputs, runs, kwargs)


def _run_pass(p: GraphtricksPass, run: PassRun, report: Report) -> None:
    """Run one pass over every region that exists now, and add what it did to ``report``."""
    reason = p.skip_reason()
    if reason:
        warnings.warn(reason, NoChangeWarning, stacklevel=4)
        report.warnings.append(reason)
        return
    p.run(run)
    report.changes.extend(run.changes)
    if run.skipped:
        counts = report.skipped.setdefault(p.name, {})
        for what, n in run.skipped.items():
            counts[what] = counts.get(what, 0) + n
    for note in run.notes:  # notebook users see what the CLI prints
        warnings.warn(f"{p.name}: {note}", PassNoteWarning, stacklevel=4)
        report.warnings.append(f"{p.name}: {note}")
    if not run.changes:
        left = ", ".join(f"{n} {what.replace('_', ' ')}" for what, n in run.skipped.items())
        message = (f"pass {p.name!r} changed nothing in this model: it left alone {left} (its notes say where)"
                   if left else f"pass {p.name!r} matched nothing in this model; it changed nothing")
        warnings.warn(message, NoChangeWarning, stacklevel=4)
        report.warnings.append(message)
