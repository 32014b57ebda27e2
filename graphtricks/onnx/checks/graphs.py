"""Check 3: the train and inference graphs against each other, without running them.

Both graphs must be the same model: the same inputs and outputs, identical weights, and the
same operators once train-only ones are set aside: Dropout, the random subgraphs of stochastic
depth with the node applying their mask, and the constants only they read
(:mod:`graphtricks.onnx.train_only`). Operators are those computing on data: the arithmetic on
shapes and constants that an exporter folds in one mode and not the other is no part of the model.
A dropout on a path that reads no input (an MLP over a fixed relative-position table) is a
dropout like any other: what feeds it is shared with the inference graph and compared.
The inference graph must hold no train-only operator.

A model whose own forward differs between modes by more than dropout (``x * 0.5 if
self.training``) has graphs that rightly differ: :func:`eager_mode_difference` runs it in both
modes and counts the torch calls on its data, so the operator check can tell that apart; and a
model whose forwards read different tensors (an eval-mode cache of a weight-derived tensor, read
in place of the weights the train forward indexes) has weights that rightly differ:
:func:`eager_modes` records what each mode reads, so the weight check can tell that apart.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from graphtricks.errors import ValidationError
from graphtricks.fxgraph.kinds import DROPOUT_FUNCTIONS
from graphtricks.onnx.draws import DRAW_FUNCTIONS
from graphtricks.onnx.eager import reference_copy, torch_numerics
from graphtricks.onnx.graph import (
    TRAIN_ONLY_OPS,
    initializer_arrays,
    io_signature,
    train_mode_batchnorms,
)
from graphtricks.onnx.names import CONSTANT_PREFIX, train_only_names
from graphtricks.onnx.portable import BN_TAG, DROPOUT_TAG, main_outputs
from graphtricks.onnx.report import CheckResult
from graphtricks.onnx.train_only import (
    fixed_values,
    operator_multiset,
    train_only_feeds,
    train_only_output_nodes,
)
from graphtricks.onnx.weights import TRANSPOSED_SUFFIX, release_pages

__all__ = [
    "EagerModes",
    "check_infer_has_no_train_ops",
    "check_io",
    "check_operators",
    "check_weights",
    "eager_eval_batch_statistics",
    "eager_mode_difference",
    "eager_modes",
]


def _describe(signature: list[tuple]) -> list[str]:
    return [
        f"{name}:{helper.tensor_dtype_to_np_dtype(t) if t else '?'}/rank{rank}"
        for name, t, rank in signature
    ]


def check_io(train: onnx.ModelProto, infer: onnx.ModelProto) -> CheckResult:
    """Same graph inputs and outputs: names, element types and ranks, in order.

    The train graph may output more: a portable graph's running statistics (``updated.*``)
    and what the model returns in train mode only (``train_only.*``), listed by name.

    Args:
        train: The train graph.
        infer: The inference graph.

    Returns:
        The result; on failure the message lists both signatures.
    """
    (t_in, t_out), (i_in, i_out) = io_signature(train), io_signature(infer)
    # A portable train graph's running statistics (updated.<buffer>) are outputs of its own.
    main = set(main_outputs([name for name, _, _ in t_out]))
    extra = [name for name, _, _ in t_out if name not in main]
    # ... and so are the outputs the model returns in train mode only (auxiliary heads).
    only_train = train_only_names([name for name, _, _ in t_out])
    t_out = [sig for sig in t_out if sig[0] in main and sig[0] not in only_train]
    problems = []
    if t_in != i_in:
        problems.append(f"inputs differ: train {_describe(t_in)} vs infer {_describe(i_in)}")
    if t_out != i_out:
        problems.append(f"outputs differ: train {_describe(t_out)} vs infer {_describe(i_out)}")
    message = "; ".join(problems) or (
        f"same {len(t_in)} input(s) and {len(t_out)} output(s): {', '.join(_describe(t_out))}"
        + (f"; the train graph also outputs {len(extra)} running statistic(s)" if extra else "")
        + (f"; train-only output(s) of the train graph: {', '.join(only_train)}" if only_train else "")
    )
    return CheckResult(
        name="graphs_same_io", passed=not problems, message=message, graph="both",
        details={"inputs": _describe(t_in), "outputs": _describe(t_out), "train_only": extra,
                 "train_only_outputs": only_train},
    )


def _raw_bytes(array: np.ndarray) -> np.ndarray:
    """The array's bytes as a flat uint8 view (no copy when it is contiguous already)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _content_key(array: np.ndarray) -> tuple:
    """Identifies an array by dtype, shape and bytes, to match weights stored under other names."""
    digest = hashlib.blake2b(_raw_bytes(array), digest_size=16).hexdigest()
    return str(array.dtype), array.shape, digest


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The initializers both graphs must share: not a train-only op's parameters, nor those of
    what computes only train-only outputs (an auxiliary head), nor the constants of a portable
    train graph's dropout and batch statistics, nor the exporter's one-value constants (the
    ``0.5`` of a model's own ``if self.training: x = x * 0.5``: an operand, as a ``Constant`` node
    is in a TorchScript graph, judged by the operator check)."""
    skip = train_only_feeds(model) | train_only_output_nodes(model)[1]
    return {
        k: v for k, v in initializer_arrays(model).items()
        if k not in skip and not k.startswith((DROPOUT_TAG, BN_TAG))
        and not (k.startswith(CONSTANT_PREFIX) and v.size <= 1)
    }


def _unmatched(mine: Mapping[str, np.ndarray], theirs: Mapping[str, np.ndarray]) -> list[str]:
    """Names in ``mine`` absent from ``theirs`` whose content no weight of ``theirs`` has."""
    absent = {k: v for k, v in mine.items() if k not in theirs}
    # Hashing reads every byte: only the candidates of the same dtype and shape are hashed.
    kinds = {(str(v.dtype), v.shape) for v in absent.values()}
    keys = {_content_key(v) for v in theirs.values() if (str(v.dtype), v.shape) in kinds}
    return sorted(k for k, v in absent.items() if _content_key(v) not in keys)


def _read_in_one_mode(
    names: Sequence[str], arrays: Mapping[str, np.ndarray], modes: EagerModes, mine: str, other: str
) -> list[str]:
    """The ``names`` (weights of the ``mine`` mode's graph only) that the model's own ``mine``
    forward reads and its ``other`` forward does not: a parameter or buffer (or its transposed
    form, ``W.T``), or one of its constants (a cache an earlier forward made, or a slice of it)."""
    state_only = modes.state[mine] - modes.state[other]
    fixed_only = modes.fixed[mine] - modes.fixed[other]
    known = modes.state[mine] | modes.state[other]
    out = []
    for name in names:
        base = name.removesuffix(TRANSPOSED_SUFFIX)
        if base in known:
            if base in state_only:
                out.append(name)
        elif _content_key(arrays[name]) in fixed_only:
            out.append(name)
    return out


def check_weights(
    train: onnx.ModelProto,
    infer: onnx.ModelProto,
    modes: Callable[[], EagerModes] | None = None,
) -> CheckResult:
    """Identical weights: every initializer equal bit for bit, matched by name, else by content.

    A weight one graph alone holds fails the check unless the model's own forward reads it in
    that mode only (``modes``, called only then, e.g. :func:`eager_modes`): a parameter the
    train forward indexes while the eval forward reads a cache made from it (timm
    EfficientFormerV2's attention biases), and that cache. A weight both graphs hold must
    still be equal.

    Args:
        train: The train graph.
        infer: The inference graph.
        modes: Gives what the model's own forward reads in each mode; None: the graphs must
            hold the same weights.

    Returns:
        The result, naming the first differing weights and the largest difference.
    """
    tw, iw = _weights(train), _weights(infer)
    differing, max_abs = [], 0.0
    for name in sorted(set(tw) & set(iw)):
        a, b = tw[name], iw[name]
        if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(_raw_bytes(a), _raw_bytes(b)):
            differing.append(name)
            if a.shape == b.shape and a.dtype.kind in "fiu":
                max_abs = max(max_abs, float(np.abs(a.astype(np.float64) - b).max(initial=0)))
        # read once: two self-contained files' weights would otherwise end up resident together
        release_pages(a)
        release_pages(b)
    only_train, only_infer = _unmatched(tw, iw), _unmatched(iw, tw)
    by_mode: list[str] = []
    if (only_train or only_infer) and modes is not None:
        eager = modes()
        by_mode = _read_in_one_mode(only_train, tw, eager, "train", "eval")
        by_mode += _read_in_one_mode(only_infer, iw, eager, "eval", "train")
        only_train = [n for n in only_train if n not in by_mode]
        only_infer = [n for n in only_infer if n not in by_mode]
    problems = []
    if differing:
        problems.append(f"weights differ: {differing[:5]} (max abs difference {max_abs:.3g})")
    if only_train:
        problems.append(f"only in train graph: {only_train[:5]}")
    if only_infer:
        problems.append(f"only in infer graph: {only_infer[:5]}")
    shared = len(set(tw) & set(iw))
    message = "; ".join(problems) or f"{shared} weight(s) identical in both graphs"
    if by_mode:
        message += (
            f"; {len(by_mode)} weight(s) in one graph only as the model's own forward reads them "
            f"in that mode only: {by_mode[:5]}"
        )
    return CheckResult(
        name="graphs_same_weights", passed=not problems, graph="both",
        max_abs=max_abs if differing else 0.0, atol=0.0, rtol=0.0,
        message=message,
        details={
            "differing": differing, "only_train": only_train, "only_infer": only_infer,
            "read_in_one_mode": by_mode,
            "train_count": len(tw), "infer_count": len(iw),
        },
    )


# Calls whose result does not depend on their tensor argument's values (a stochastic-depth
# mask is drawn into x.new_empty(...)).
_VALUE_FREE = frozenset(
    {"new_empty", "new_zeros", "new_ones", "new_full", "empty_like", "zeros_like", "ones_like",
     "full_like"}
)


class _CallCounter(TorchFunctionMode):
    """Counts the torch calls computing on data: the inputs, the weights, what comes from them.

    Dropout and random draws, and what computes from a draw (a stochastic-depth mask and the
    ``Mul`` applying it), are not counted: both differ between modes by design. It also records
    which parameters and buffers the forward reads (``state``), and its constants (``fixed``):
    the tensors it reads that are none of those and that no call of this forward made (a cache
    an earlier forward filled), and what it computes from them alone (one head's slice of that
    cache): what an exporter writes, or folds, into constants.
    """

    def __init__(self, data: Sequence[torch.Tensor], state: Mapping[int, set[str]]) -> None:
        super().__init__()
        self.calls: Counter = Counter()
        self.state: set[str] = set()
        self.fixed: dict[int, torch.Tensor] = {}
        self._data = {id(t): t for t in data}  # holding the tensors keeps their ids unique
        self._inputs = dict(self._data)
        self._state_ids = state
        self._made: dict[int, torch.Tensor] = {}
        self._random: dict[int, torch.Tensor] = {}

    def _mark(self, marks: dict[int, torch.Tensor], value: Any) -> list[torch.Tensor]:
        tensors = [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
        marks.update((id(t), t) for t in tensors)
        return tensors

    def _note_reads(self, read: Sequence[torch.Tensor]) -> None:
        for t in read:
            if id(t) in self._state_ids:
                self.state |= self._state_ids[id(t)]
            elif id(t) not in self._made and id(t) not in self._inputs:
                self.fixed[id(t)] = t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        read = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self._note_reads(read)
        out = func(*args, **kwargs)
        if read and func not in DRAW_FUNCTIONS and all(id(t) in self.fixed for t in read):
            self._mark(self.fixed, out)  # computed from constants alone: a constant
        random = any(id(t) in self._random for t in read)
        data = any(id(t) in self._data for t in read)
        if func in DRAW_FUNCTIONS or (random and not data):  # a mask: Tensor.bernoulli_ fills self
            self._mark(self._random, (out, args[:1] if func in DRAW_FUNCTIONS else ()))
        elif data and getattr(func, "__name__", "") not in _VALUE_FREE:
            # data * mask applies a mask: its result is data, the call is not counted
            counted = not random and func not in DROPOUT_FUNCTIONS
            if self._mark(self._data, out) and counted:
                self.calls[getattr(func, "__name__", repr(func))] += 1
        self._mark(self._made, out)
        return out


def _tensor_key(tensor: torch.Tensor) -> tuple | None:
    """:func:`_content_key` of a tensor, None for a dtype numpy lacks (bfloat16) or no data (meta)."""
    try:
        return _content_key(tensor.detach().cpu().numpy())
    except (TypeError, RuntimeError, NotImplementedError):
        return None


@dataclass(frozen=True)
class EagerModes:
    """What one train-mode and one eval-mode forward of the model compute and read.

    Attributes:
        calls: ``{mode: Counter}`` of the torch calls on data (``"train"``, ``"eval"``).
        state: ``{mode: names}`` of the parameters and buffers the forward reads.
        fixed: ``{mode: content keys}`` of its constants: the tensors it reads that are no input,
            parameter or buffer and that it did not compute itself (a cache an earlier forward
            filled), and what it computes from them alone.
    """

    calls: dict[str, Counter]
    state: dict[str, frozenset[str]]
    fixed: dict[str, frozenset[tuple]]

    def call_difference(self) -> dict[str, tuple[int, int]]:
        """``{function name: (train count, eval count)}`` for each count that differs."""
        trains, evals = self.calls["train"], self.calls["eval"]
        return {
            name: (trains[name], evals[name])
            for name in sorted(set(trains) | set(evals))
            if trains[name] != evals[name]
        }


def eager_modes(
    model: nn.Module, inputs: Sequence[torch.Tensor], device: str = "cpu"
) -> EagerModes:
    """Runs the model in eval then train mode, twice each, recording the second forward.

    The first forward of each mode runs as export runs the twin before tracing it: a model that
    caches a tensor derived from its weights in eval mode (timm EfficientFormerV2's and LeViT's
    attention biases) reads the cache from then on, and so does the traced graph.

    Args:
        model: The model (not changed: a copy runs, eval mode first).
        inputs: The example inputs.
        device: Where the copy runs.

    Returns:
        The calls and reads of each mode.

    Raises:
        ValidationError: The model cannot be copied or rejects the inputs.
    """
    twin = reference_copy(model, train=False, device=device)
    state: dict[int, set[str]] = {}
    for name, t in [*twin.named_parameters(remove_duplicate=False),
                    *twin.named_buffers(remove_duplicate=False)]:
        state.setdefault(id(t), set()).add(name)
    calls, reads, fixed = {}, {}, {}
    with torch_numerics(device), torch.no_grad():
        for mode in ("eval", "train"):
            twin.train(mode == "train")
            moved = [t.to(device) for t in inputs]
            counter = _CallCounter(moved + list(twin.parameters()), state)
            try:
                twin(*moved)  # as export's run before the trace: caches fill
                with counter:
                    twin(*moved)
            except Exception as e:
                raise ValidationError(
                    f"the model rejects the validation inputs ({type(e).__name__}: {e}); "
                    "pass example inputs of the shapes and dtypes it expects"
                ) from e
            calls[mode], reads[mode] = counter.calls, frozenset(counter.state)
            fixed[mode] = frozenset(
                k for k in map(_tensor_key, counter.fixed.values()) if k is not None
            )
    return EagerModes(calls, reads, fixed)


def eager_mode_difference(
    model: nn.Module, inputs: Sequence[torch.Tensor], device: str = "cpu"
) -> dict[str, tuple[int, int]]:
    """The torch calls on data whose counts differ between a train- and an eval-mode forward.

    Dropout, random draws and what computes from them are not counted; empty when the model's
    own forward does the same computation in both modes (:func:`eager_modes`).

    Args:
        model: The model (not changed: a copy runs, eval mode first).
        inputs: The example inputs.
        device: Where the copy runs.

    Returns:
        ``{function name: (train count, eval count)}`` for each count that differs.

    Raises:
        ValidationError: The model cannot be copied or rejects the inputs.
    """
    return eager_modes(model, inputs, device).call_difference()


def check_operators(
    train: onnx.ModelProto,
    infer: onnx.ModelProto,
    mode_difference: Callable[[], Mapping[str, tuple[int, int]]] | None = None,
) -> CheckResult:
    """The same operator multiset in both graphs, train-only operators aside.

    Counts that differ fail the check unless the model's own forward differs between modes
    the same way: ``mode_difference`` (called only then, e.g. :func:`eager_mode_difference`)
    must show calls made more often in train mode for operators the train graph has more of,
    and calls made more often in eval mode for operators the inference graph has more of.

    Args:
        train: The train graph.
        infer: The inference graph.
        mode_difference: Gives the model's own difference between modes,
            ``{name: (train count, eval count)}``; None: the graphs must match.

    Returns:
        The result; the message lists the operators whose counts differ, and the model's
        calls that explain them.
    """
    tc, ic = operator_multiset(train), operator_multiset(infer)
    diff = {
        f"{op}" if domain == "ai.onnx" else f"{domain}.{op}": (tc[(domain, op)], ic[(domain, op)])
        for domain, op in sorted(set(tc) | set(ic))
        if tc[(domain, op)] != ic[(domain, op)]
    }
    eager = dict(mode_difference()) if diff and mode_difference is not None else {}
    train_more = any(t > i for t, i in diff.values())
    infer_more = any(i > t for t, i in diff.values())
    explained = bool(eager) and (not train_more or any(t > e for t, e in eager.values())) and (
        not infer_more or any(e > t for t, e in eager.values())
    )
    message = (
        "operator counts differ (train, infer): "
        + ", ".join(f"{op}={counts}" for op, counts in diff.items())
        if diff
        else f"same {sum(tc.values())} operators on data besides train-only ones"
    )
    if eager:
        calls = ", ".join(f"{name}={counts}" for name, counts in eager.items())
        message += (
            f"; {'as' if explained else 'not as'} the model's own forward differs between "
            f"modes (torch calls on data (train, eval): {calls})"
        )
    return CheckResult(
        name="graphs_same_operators", passed=not diff or explained, message=message,
        graph="both",
        details={
            "differing": {k: list(v) for k, v in diff.items()},
            "eager_differing": {k: list(v) for k, v in eager.items()},
        },
    )


def _batch_statistics_only(model: onnx.ModelProto) -> list[str]:
    """Train-mode BatchNormalization nodes fed statistics the graph computes from data.

    A BatchNorm without running statistics (``track_running_stats=False``) normalises with
    batch statistics in eval mode too; the exporter then computes the batch mean and variance
    itself (``ReduceMean``) and feeds them to a ``training_mode=1`` node. A BatchNorm that has
    running statistics, exported in train mode, is fed them as fixed values instead.
    """
    fixed, names = fixed_values(model), []
    for i, node in enumerate(model.graph.node):
        if node.op_type != "BatchNormalization" or len(node.input) < 5:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        computed = not ({node.input[3], node.input[4]} & fixed)
        if attrs.get("training_mode", 0) == 1 and computed:
            names.append(node.name or f"BatchNormalization#{i}")
    return names


class _BatchStatCounter(TorchFunctionMode):
    """Counts ``F.batch_norm`` calls that normalise with batch statistics (``training=True``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.batch_norm:
            training = kwargs.get("training", args[5] if len(args) > 5 else False)
            self.count += bool(training)
        return func(*args, **kwargs)


def eager_eval_batch_statistics(
    model: nn.Module, inputs: Sequence[torch.Tensor], device: str = "cpu"
) -> int:
    """How many ``F.batch_norm`` calls normalise with batch statistics in one eval forward.

    timm's ``StdConv2dSame`` standardises its own weight with ``F.batch_norm(training=True)``
    in every mode: its inference graph keeps a train-mode BatchNormalization by right.

    Raises:
        ValidationError: The model cannot be copied or rejects the inputs.
    """
    twin, counter = reference_copy(model, train=False, device=device), _BatchStatCounter()
    try:
        with torch_numerics(device), torch.no_grad(), counter:
            twin(*(t.to(device) for t in inputs))
    except Exception as e:
        raise ValidationError(
            f"the model rejects the validation inputs ({type(e).__name__}: {e}); "
            "pass example inputs of the shapes and dtypes it expects"
        ) from e
    return counter.count


def check_infer_has_no_train_ops(
    infer: onnx.ModelProto, eval_batch_statistics: Callable[[], int] | None = None
) -> CheckResult:
    """The inference graph holds no Dropout, no random operator and no train-mode BatchNorm.

    A train-mode BatchNormalization fed batch statistics the graph computes (a BatchNorm
    without running statistics, which uses batch statistics in eval mode too) is no offender;
    one fed fixed running statistics is, unless the model itself normalises with batch
    statistics in eval mode as often (``eval_batch_statistics``, e.g.
    :func:`eager_eval_batch_statistics`): the check follows what the eager model does.

    Args:
        infer: The inference graph.
        eval_batch_statistics: Gives how many batch-statistics ``F.batch_norm`` calls one
            eval-mode forward makes; called only when train-mode BatchNorms are found.

    Returns:
        The result, naming the offending nodes.
    """
    untracked = _batch_statistics_only(infer)
    batchnorms = [name for name in train_mode_batchnorms(infer) if name not in untracked]
    eager = eval_batch_statistics() if batchnorms and eval_batch_statistics is not None else 0
    by_right = batchnorms if 0 < len(batchnorms) <= eager else []
    offenders = [
        n.name or f"{n.op_type}#{i}"
        for i, n in enumerate(infer.graph.node)
        if n.op_type in TRAIN_ONLY_OPS
    ] + [name for name in batchnorms if name not in by_right]
    message = (
        f"inference graph holds train-only nodes: {offenders[:5]}"
        if offenders
        else "inference graph holds no Dropout, random operator or train-mode BatchNormalization"
    )
    if untracked:
        message += (
            f"; {len(untracked)} train-mode BatchNormalization node(s) {untracked[:3]} normalise "
            "with batch statistics the graph computes (BatchNorm without running statistics)"
        )
    if by_right:
        message += (
            f"; {len(by_right)} train-mode BatchNormalization node(s) {by_right[:3]} as the "
            f"model's eval forward normalises with batch statistics {eager} time(s)"
        )
    return CheckResult(
        name="infer_has_no_train_ops", passed=not offenders, graph="infer", message=message,
        details={"offenders": offenders, "batch_statistics_batchnorms": untracked,
                 "eager_eval_batch_statistics": by_right},
    )
