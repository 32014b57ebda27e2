"""Export a model twice, as a train-mode and an inference ONNX graph, and write them atomically.

By default both graphs come from torch's ``torch.export``-based exporter (:mod:`graphtricks.onnx.dynamo`),
which by itself exports a train-mode model as its inference graph (dropout inert, BatchNorm folded
into the Conv with running statistics). What it exports is therefore the model's *twin*
(:mod:`graphtricks.onnx.twin`): its train-mode forward with dropout and batch statistics as
explicit ops, the running statistics as outputs. The weights are never folded, and keep the
model's names in both graphs, so the graphs can be compared weight for weight and operator for
operator. Where torch.export cannot capture the model (data-dependent control flow), the pair
falls back to the legacy TorchScript exporter (:mod:`graphtricks.onnx.torchscript`, selectable
too), whose train graph is made portable after the export (:mod:`graphtricks.onnx.portable`).
With ``mc_dropout``, a third graph, ``model.mc.onnx``: the eval forward with every dropout on.
The train graph is checked against PyTorch, as written to a private folder, before any file is
put in place.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from graphtricks.collector import collector_paused
from graphtricks.errors import ExportError, ValidationError
from graphtricks.io.files import public_modes
import graphtricks.onnx.fixups as fixups
from graphtricks.onnx.checks.dropout import check_dropout_count
from graphtricks.onnx.checks.numeric import check_train_deterministic
from graphtricks.onnx.checks.stochastic import check_random_count
from graphtricks.onnx.eager import torch_numerics
from graphtricks.onnx.graph import dropout_infos, train_mode_batchnorms
from graphtricks.onnx.inputs import InputSet, as_input_tuple
from graphtricks.onnx.dynamo import (
    DYNAMO_MIN_OPSET,
    CaptureFailed,
    dynamic_shapes_for,
    export_copy,
    export_twin,
)
from graphtricks.onnx.names import (
    INFER_FILE,
    MC_FILE,
    TRAIN_FILE,
    checked_names,
    default_input_names,
    mode_outputs,
    train_only_names,
    train_output_names,
)
from graphtricks.onnx.portable import make_portable, name_twin_sites, portable_dropouts, updated_outputs
from graphtricks.onnx.report import Tolerance, default_tolerance
from graphtricks.onnx.runtime import TRAIN_BN_DISABLED_OPTIMIZERS, make_session
from graphtricks.onnx.torchscript import export_mode, export_notes
from graphtricks.onnx.train_only import deterministic_train_copy, random_subgraphs
from graphtricks.onnx.weights import (
    DATA_FILE,
    EXTERNAL_DATA_THRESHOLD,
    WeightTable,
    checkable,
    graph_bytes,
    is_stub,
    load_mapped,
    resolve_external,
    write_graphs,
)

__all__ = [
    "EXPORTERS",
    "INFER_FILE",
    "MC_FILE",
    "MAX_OPSET",
    "MIN_OPSET",
    "TRAIN_FILE",
    "TRAIN_GRAPHS",
    "ExportResult",
    "export_pair",
]

# "portable": Dropout and train-mode BatchNorm as primitive ops (graphtricks.onnx.portable), run
# as written by any runtime and execution provider; "standard": as the exporter writes them.
TRAIN_GRAPHS = ("portable", "standard")
# "dynamo": torch.export + torch.onnx.export(program), the default; "torchscript": the legacy exporter
EXPORTERS = ("dynamo", "torchscript")

MIN_OPSET = 14  # BatchNormalization got its training_mode attribute in opset 14
try:
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as MAX_OPSET
except ImportError:  # private constant; 20 is its value from torch 2.1 to 2.14
    MAX_OPSET = 20

# Export verification looks for wrong semantics (0.1-scale errors), not for the last ulp.
_VERIFY_SLACK = 10.0


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_pair` wrote.

    Attributes:
        train_path: The train-mode graph (Dropout and batch-statistics BatchNorm kept).
        infer_path: The inference graph.
        opset: The ONNX opset of both graphs.
        exporter: Which torch exporter produced them (``"dynamo"`` or ``"torchscript"``).
        input_names: The graph inputs, in order.
        output_names: The graph outputs, in order.
        dynamic_batch: Whether dimension 0 of inputs and outputs is symbolic.
        dynamic_dims: The symbolic dimensions of each input, by input name.
        graph_exporters: Which exporter wrote each file, by file name.
        mc_path: The MC-dropout graph, when asked for.
        repairs: Every edit made to the exported graphs, one phrase each.
        notes: What a user of the files must know (e.g. ONNX Runtime settings they need).
        warnings: Exporter warnings worth a reader's attention (known noise is dropped).
        seconds: Wall time of the export, verification included.
        data_path: The external data file both graphs read their weights from, or None when
            each graph holds its own.
        train_only_outputs: The train graph's outputs the model returns in train mode only
            (``train_only.aux_logits1``), after ``output_names``; the inference graph has none.
    """

    train_path: Path
    infer_path: Path
    opset: int
    exporter: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_batch: bool
    repairs: tuple[str, ...]
    notes: tuple[str, ...]
    warnings: tuple[str, ...]
    seconds: float
    data_path: Path | None = None
    train_only_outputs: tuple[str, ...] = ()
    dynamic_dims: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    graph_exporters: dict[str, str] = dataclasses.field(default_factory=dict)
    mc_path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """Returns the result as JSON-able types."""
        out = dataclasses.asdict(self)
        out.update(train_path=str(self.train_path), infer_path=str(self.infer_path))
        out["data_path"] = None if self.data_path is None else str(self.data_path)
        out["mc_path"] = None if self.mc_path is None else str(self.mc_path)
        out.update({k: list(v) for k, v in out.items() if isinstance(v, tuple)})
        out["seconds"] = round(self.seconds, 3)
        return out


def _repair(updated: list[str], train: onnx.ModelProto, infer: onnx.ModelProto) -> list[str]:
    """Applies every fixup, and raises if the inference graph still trains."""
    repairs = [(
        f"train: reset {len(updated)} initializer(s) the export trace had updated to the model's "
        f"values ({', '.join(updated[:3])}{', ...' if len(updated) > 3 else ''})"
    )] if updated else []
    repairs += [
        f"train: Dropout '{n}' had no training_mode; set it on"
        for n in fixups.activate_untagged_dropouts(train)
    ]
    removed, still_training = fixups.strip_inert_dropouts(infer)
    if still_training:
        raise ExportError(
            f"the inference graph applies dropout at {still_training[:3]}: the model drops out in "
            "eval mode (an fx graph traced in train mode bakes training=True in); "
            "trace it in eval mode"
        )
    repairs += [f"infer: removed inert Dropout '{n}'" for n in removed]
    repairs += [
        f"infer: gave '{n}' its own initializer again"
        for n in fixups.undo_initializer_dedup(infer)
    ]
    return repairs


def _verify_train_graph(model: nn.Module, inputs: tuple, train: onnx.ModelProto) -> None:
    """Refuses a train graph that disagrees with PyTorch train mode on the example inputs.

    Dropout is neutralised and random draws (stochastic depth) fixed on both sides, and the
    graph must hold as many Dropouts and random operators as PyTorch applies.
    """

    def tolerance(dtype: torch.dtype) -> Tolerance:
        tol = default_tolerance(dtype, "cpu")
        return Tolerance(tol.atol * _VERIFY_SLACK, tol.rtol * _VERIFY_SLACK)

    # Only a standard train graph needs an optimizer off; a portable one runs in a default session.
    disabled = TRAIN_BN_DISABLED_OPTIMIZERS if train_mode_batchnorms(train) else ()
    try:
        session = make_session(
            deterministic_train_copy(train), "cpu", "train_deterministic", True, disabled
        )
        results, eager_ps, draws = check_train_deterministic(
            session, model, [InputSet("example inputs", None, inputs)], tolerance
        )
    except ValidationError as e:
        raise ExportError(f"cannot verify the train graph: {e}") from e
    results.append(check_dropout_count(dropout_infos(train) + portable_dropouts(train), eager_ps))
    results.append(check_random_count(random_subgraphs(train), draws))
    failed = [r for r in results if not r.passed]
    if failed:
        raise ExportError(
            f"the exported train graph disagrees with PyTorch train mode: {failed[0].message}; "
            "nothing was written"
        )


def _check_written(path: str, name: str) -> None:
    """Runs the ONNX checker on a graph just written: on the file when its weights are in a data
    file, else on its structure with the weights mapped (the checker would read them whole)."""
    try:
        with WeightTable() as table:
            try:
                model = load_mapped(Path(path), table)
            except Exception as e:  # not a well-formed protobuf message
                raise onnx.checker.ValidationError(str(e)) from e
            external = any(
                i.data_location == onnx.TensorProto.EXTERNAL and not is_stub(i)
                for i in model.graph.initializer
            )
            onnx.checker.check_model(path if external else checkable(model))
    except onnx.checker.ValidationError as e:
        first = (str(e).strip().splitlines() or ["invalid"])[0]
        raise ExportError(f"the exported graph {name} is not valid ONNX: {first}; nothing was written") from e


def _verify_written_train_graph(model: nn.Module, inputs: tuple, path: Path) -> None:
    """:func:`_verify_train_graph` on the train graph as written to ``path``, its weights mapped
    from the file (the data file, or the graph file itself) rather than the model's tensors.

    ONNX Runtime copies arrays handed to it from memory (and a transposed weight ``W.T`` was
    first made contiguous, another copy), which took export to 3x the parameter bytes on a
    BERT or Llama; weights mapped from a file it uses in place, as validation does
    (:func:`graphtricks.onnx.runtime.prepare_graph`). The check itself is the same, and now
    covers the bytes that were written.
    """
    with WeightTable() as table:
        try:
            written = load_mapped(path, table)
        except ValueError as e:
            raise ExportError(f"cannot read back the written train graph: {e}") from e
        resolve_external(written, path.parent, table, ExportError, "train")
        _verify_train_graph(model, inputs, written)


def _sync(paths: list[Path]) -> None:
    """Flushes files to disk, so that a crash after their rename cannot leave them empty."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomically(
    out_dir: Path,
    graphs: dict[str, onnx.ModelProto],
    external: bool,
    verify: Callable[[Path], None] | None = None,
) -> Path | None:
    """Writes every graph (and, ``external``, their shared data file) into a private folder in
    ``out_dir``, checks them there, then renames them all into place.

    Args:
        verify: Called with the private folder once the graphs there passed the ONNX checker;
            an error it raises leaves nothing written.

    Returns:
        The data file, or None for self-contained graphs.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output path {out_dir} is a file; pass a folder")
    staging: Path | None = None
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # deepest first
    placed = False
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".export."))
        paths = {name: str(staging / name) for name in graphs}
        write_graphs(paths, graphs, str(staging / DATA_FILE) if external else None)
        names = list(graphs) + ([DATA_FILE] if external else [])
        # Flushing waits on the disk (a second per 800 MB here): it runs while the files are
        # checked, and is done before any is renamed into place.
        with ThreadPoolExecutor(max_workers=1) as pool:
            synced = pool.submit(_sync, [staging / name for name in names])
            for name, path in paths.items():
                _check_written(path, name)
            if verify is not None:
                verify(staging)
            synced.result()
        public_modes(*(staging / name for name in names))  # not mkdtemp's 0600
        placed = True
        for name in names:
            os.replace(staging / name, out_dir / name)
        if not external:  # a data file of an earlier export would belong to no graph now
            (out_dir / DATA_FILE).unlink(missing_ok=True)
        if MC_FILE not in graphs:  # nor would an earlier MC-dropout graph
            (out_dir / MC_FILE).unlink(missing_ok=True)
    except OSError as e:
        raise ExportError(f"cannot write ONNX files to {out_dir}: {e}") from e
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for folder in created if not placed else ():  # a failed export leaves no new folder
            try:
                folder.rmdir()
            except OSError:
                break
    return out_dir / DATA_FILE if external else None


@dataclass
class _Names:
    """The graph inputs and outputs of an export, and what the model returns in each mode."""

    inputs: list[str]
    outputs: list[str]
    train: list[str]
    train_only: list[str]
    left_out: list[str]
    out_tensors: list[torch.Tensor]
    train_tensors: list[torch.Tensor]


def _graph_names(model: nn.Module, inputs: tuple, input_names: Any, output_names: Any,
                 copy: nn.Module | None) -> _Names:
    """Runs the model (``copy``, a copy of it) in both modes and settles the graph input and
    output names."""
    named, left_out, in_train = mode_outputs(model, inputs, copy)
    outputs = [t for _, t in named]
    in_names = checked_names(input_names, len(inputs), default_input_names(model, len(inputs)), "input_names")
    out_names = checked_names(output_names, len(outputs), [n for n, _ in named], "output_names")
    train_names = train_output_names(named, in_train, out_names)
    return _Names(in_names, out_names, train_names, train_only_names(train_names), left_out,
                  outputs, [t for _, t in in_train])


def _dynamic_dims(
    inputs: tuple, names: list[str], dynamic_batch: bool, dynamic_dims: Mapping[str, Any] | None
) -> dict[str, list[int]]:
    """The symbolic dimensions by input name: ``dynamic_dims``, and dimension 0 of every ranked
    input with ``dynamic_batch``; negative dimensions counted from the end."""
    dims: dict[str, list[int]] = {}
    shapes = dict(zip(names, inputs))
    for name, wanted in (dynamic_dims or {}).items():
        if name not in shapes:
            raise ExportError(f"--dynamic-dim names input '{name}', which the model does not have; "
                              f"its inputs are {', '.join(names)}")
        rank = shapes[name].dim()
        for d in [wanted] if isinstance(wanted, int) else wanted:
            if isinstance(d, bool) or not isinstance(d, int) or not -rank <= d < rank:
                raise ExportError(f"--dynamic-dim {name}:{d}: input '{name}' has {rank} dimension(s); "
                                  f"give one of 0 to {rank - 1}")
            dims.setdefault(name, []).append(d % rank)
    if dynamic_batch:
        for name, t in shapes.items():
            if t.dim():
                dims.setdefault(name, []).insert(0, 0)
    return {n: sorted(set(d)) for n, d in dims.items()}


def _torchscript_io(
    names: _Names, dims: dict[str, list[int]], graph_outputs: list[str], tensors: list[torch.Tensor]
) -> dict[str, Any]:
    """The TorchScript exporter's input and output names, and its ``dynamic_axes`` for ``dims``."""
    kwargs: dict[str, Any] = {"input_names": names.inputs, "output_names": graph_outputs}
    if dims:
        axes = {n: {d: ("batch" if d == 0 else f"{n}_{d}") for d in dims[n]} for n in dims}
        if any(0 in d for d in dims.values()):  # outputs keep the batch dimension
            axes.update({n: {0: "batch"} for n, t in zip(graph_outputs, tensors) if t.dim()})
        kwargs["dynamic_axes"] = axes
    return kwargs


def _torchscript_pair(
    model: nn.Module, inputs: tuple, names: _Names, dims: dict[str, list[int]], opset: int,
    train_graph: str, table: WeightTable, say: Callable[[str], None],
) -> tuple[dict[str, onnx.ModelProto], list[str], list[str]]:
    """Both graphs from the TorchScript exporter, repaired, the train graph made portable."""

    def names_of(graph_outputs: list[str], tensors: list[torch.Tensor]) -> dict[str, Any]:
        return _torchscript_io(names, dims, graph_outputs, tensors)

    updated: list[str] = []
    extra: list[str] = []
    # the portable train graph is the train twin's export; a standard one, the model's
    role = "train" if train_graph == "portable" else None
    say("exporting the train graph")
    try:
        train, caught = export_mode(model, inputs, train=True, opset=opset, table=table, updated=updated,
                                    twin_role=role, extra_outputs=extra,
                                    **names_of(names.train, names.train_tensors))
    except ExportError as e:
        if not names.train_only:
            raise
        raise ExportError(
            f"{e} (train mode returns train-only output(s) {', '.join(names.train_only)} on top of "
            "eval mode's; the exporter cannot export what computes them)"
        ) from e
    say("exporting the inference graph")
    infer, more = export_mode(model, inputs, train=False, opset=opset, table=table,
                              twin_role="infer" if role else None,  # attention decomposed alike
                              **names_of(names.outputs, names.out_tensors))
    caught = list(dict.fromkeys(caught + more))  # most warnings come once per mode
    _check_outputs(train, "train", names.train + extra)
    _check_outputs(infer, "eval", names.outputs)
    repairs = _repair(updated, train, infer)
    if role is not None:
        state = set(dict(model.named_parameters()) | dict(model.named_buffers()))
        name_twin_sites(train, state)
        name_twin_sites(infer, state)
        repairs += make_portable(train, model)  # what the twin left: attention's ONNX Dropout
    return {TRAIN_FILE: train, INFER_FILE: infer}, repairs, caught


def _check_outputs(graph: onnx.ModelProto, mode: str, want: list[str]) -> None:
    got = [o.name for o in graph.graph.output]
    if got != want:
        raise ExportError(
            f"the {mode} graph has outputs {got}, expected {want}: the model must "
            "return the same tensors in train and eval mode"
        )


def _dynamo_graphs(
    model: nn.Module, inputs: tuple, names: _Names, dims: dict[str, list[int]], opset: int,
    mc_dropout: bool, table: WeightTable, say: Callable[[str], None], copy: nn.Module | None = None,
) -> tuple[dict[str, onnx.ModelProto], list[str]]:
    """The graphs from torch.export twins (:mod:`graphtricks.onnx.twin`).

    Raises:
        CaptureFailed: torch.export or the ONNX translation cannot handle one of the graphs.
    """
    dynamic = dynamic_shapes_for(inputs, names.inputs, dims)
    common = dict(opset=opset, input_names=names.inputs, dynamic=dynamic, table=table,
                  copy=copy if copy is not None else export_copy(model))
    say("exporting the train graph")
    train, caught, updated = export_twin(model, inputs, role="train", output_names=names.train, **common)
    _check_outputs(train, "train", names.train + updated)
    say("exporting the inference graph")
    infer, more, _ = export_twin(model, inputs, role="infer", output_names=names.outputs, **common)
    _check_outputs(infer, "eval", names.outputs)
    graphs = {TRAIN_FILE: train, INFER_FILE: infer}
    if mc_dropout:
        say("exporting the MC-dropout graph")
        graphs[MC_FILE], mc_warnings, _ = export_twin(
            model, inputs, role="mc", output_names=names.outputs, **common
        )
        more += mc_warnings
    return graphs, list(dict.fromkeys(caught + more))


def _mc_by_torchscript(model: nn.Module, inputs: tuple, names: _Names, dims: dict[str, list[int]], opset: int,
                       table: WeightTable) -> onnx.ModelProto:
    """The MC-dropout graph when the pair came from TorchScript: the MC twin's eval export, with
    the pair's dynamic dimensions."""
    mc, _ = export_mode(model, inputs, train=False, opset=opset, table=table, twin_role="mc",
                        **_torchscript_io(names, dims, names.outputs, names.out_tensors))
    name_twin_sites(mc, set(dict(model.named_parameters()) | dict(model.named_buffers())))
    return mc


def _export_graphs(
    model: nn.Module, inputs: tuple, names: _Names, dims: dict[str, list[int]], opset: int,
    exporter: str, train_graph: str, mc_dropout: bool, table: WeightTable, say: Callable[[str], None],
    copy: nn.Module | None = None,
) -> tuple[dict[str, onnx.ModelProto], str, list[str], list[str], list[str]]:
    """Every graph, from the exporter asked for, else from TorchScript with a note saying why.

    Returns:
        The graphs by file name, the exporter that wrote them, the repairs, the warnings and
        the notes.
    """
    notes: list[str] = []
    if exporter == "dynamo":
        why = None
        if opset < DYNAMO_MIN_OPSET:
            why = f"opset {opset} is below {DYNAMO_MIN_OPSET}, the torch.export-based exporter's first"
        elif train_graph != "portable":
            why = f"a {train_graph} train graph (ONNX Dropout, BatchNormalization) comes from TorchScript only"
        else:
            try:
                graphs, caught = _dynamo_graphs(model, inputs, names, dims, opset, mc_dropout, table, say, copy)
                return graphs, "dynamo", [], caught, notes
            except CaptureFailed as e:
                why = str(e)
        notes.append(f"exported with the TorchScript exporter instead of torch.export: {why}")
    with warnings.catch_warnings():  # the legacy exporter's deprecation is graphtricks' business
        warnings.simplefilter("ignore", DeprecationWarning)
        graphs, repairs, caught = _torchscript_pair(model, inputs, names, dims, opset, train_graph, table, say)
        if mc_dropout:
            say("exporting the MC-dropout graph")
            graphs[MC_FILE] = _mc_by_torchscript(model, inputs, names, dims, opset, table)
    return graphs, "torchscript", repairs, caught, notes


def _check_arguments(opset: Any, train_graph: str, exporter: str) -> None:
    """Refuses an unsupported opset, train graph or exporter."""
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"opset {opset!r} is not supported: train-mode export needs opset {MIN_OPSET} to "
            f"{MAX_OPSET}; pass an opset in that range"
        )
    if train_graph not in TRAIN_GRAPHS:
        raise ExportError(f"unknown train_graph {train_graph!r}; choose one of {', '.join(TRAIN_GRAPHS)}")
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")


def _export_notes(model: nn.Module, names: _Names, train: onnx.ModelProto, mc: bool) -> list[str]:
    """What a user of the files must know about them."""
    notes = export_notes(model)
    if names.left_out:
        notes.append(f"outputs that hold no tensor are not graph outputs: {names.left_out}")
    if names.train_only:
        notes.append(
            f"the train graph also outputs what the model returns in train mode only: "
            f"{', '.join(names.train_only)} (the inference graph has no such output)"
        )
    updated = updated_outputs([o.name for o in train.graph.output])
    if updated:
        notes.append(
            f"the train graph also outputs the {len(updated)} running statistic(s) PyTorch "
            f"updates in train mode, named updated.<buffer> ({', '.join(updated[:3])}"
            f"{', ...' if len(updated) > 3 else ''})"
        )
    if train_mode_batchnorms(train):
        notes.append(
            "run the train graph in ONNX Runtime with disabled_optimizers="
            f"{list(TRAIN_BN_DISABLED_OPTIMIZERS)} (onnxruntime#29790), and on CPU: the CUDA "
            "provider refuses train-mode BatchNormalization at opset >= 14 (onnxruntime#16867)"
        )
    if dropout_infos(train):
        # ORT's inference build removes a Dropout whatever its training_mode (EliminateDropout
        # only keeps one whose output is a graph output or whose mask is read).
        notes.append(
            "run the train graph in ONNX Runtime with disabled_optimizers=['EliminateDropout']: "
            "otherwise ONNX Runtime removes its Dropout nodes and the graph never drops out"
        )
    if mc:
        notes.append(f"{MC_FILE}: the inference graph with every dropout on (fresh masks at every run); "
                     "run it T times, or on a batch tiled T times, for Monte Carlo dropout")
    return notes


def _counted(progress: Callable[[str], None] | None, total: int) -> Callable[[str], None]:
    """``progress`` with each line ending in its step's count: ``"exporting the train graph (1/4)"``
    (a TorchScript fallback restarts the graphs: the count stays at most ``total``)."""
    done = [0]

    def say(message: str) -> None:
        done[0] = min(done[0] + 1, total)
        if progress is not None:
            progress(f"{message} ({done[0]}/{total})")

    return say


def export_pair(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    out_dir: Path | str,
    *,
    opset: int = 18,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_batch: bool = False,
    dynamic_dims: Mapping[str, Any] | None = None,
    exporter: str = "dynamo",
    mc_dropout: bool = False,
    verify: bool = True,
    train_graph: str = "portable",
    external_data: bool = False,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Exports ``model`` as ``model.train.onnx`` and ``model.infer.onnx`` in ``out_dir``.

    The model is not changed: each mode is exported from a copy that shares its parameters (its
    buffers are its own). Both graphs share input and output names and carry the model's exact
    weights, taken from the model itself: the weights are never copied in memory. Graphs over
    ``external_data_threshold`` bytes (protobuf's 2 GiB limit), or all with ``external_data``,
    keep their weights in one data file, ``model.data``, which every graph shares.

    Args:
        model: Any ``nn.Module`` (an fx ``GraphModule`` included), on CPU.
        example_inputs: One tensor per forward argument.
        out_dir: The folder to write into (created if missing). Files appear only when every
            graph was exported, repaired and verified.
        opset: The ONNX opset, ``MIN_OPSET`` to ``MAX_OPSET`` (torch.export: 18 and up; below,
            TorchScript exports).
        input_names: Graph input names; defaults to the forward's parameter names.
        output_names: Graph output names; defaults to ``output`` or ``output_0, output_1, ...``,
            or to the keys of a mapping output (``last_hidden_state`` of a ``ModelOutput``).
            What train mode returns on top of eval mode's outputs (auxiliary heads) is a train
            graph output named ``train_only.<name>`` (a namedtuple field's or position's name).
        dynamic_batch: Makes dimension 0 of every input (and output) symbolic (``batch``).
        dynamic_dims: More symbolic dimensions: ``{"input_ids": [1]}`` (by input name).
        exporter: ``"dynamo"`` (default): ``torch.export`` twins (:mod:`graphtricks.onnx.twin`),
            falling back to TorchScript, with a note, for a model torch.export cannot capture;
            ``"torchscript"``: the legacy exporter.
        mc_dropout: Also writes ``model.mc.onnx``: eval mode with every dropout on.
        verify: Checks the train graph against PyTorch train mode (dropout neutralised, random
            draws fixed), as written to a private folder, before the files are put in place.
        train_graph: ``"portable"`` (default): train-mode dropout and BatchNorm as primitive
            ops any runtime runs as written, running statistics as outputs ``updated.<buffer>``;
            ``"standard"`` (TorchScript only): ONNX Dropout and train-mode BatchNormalization.
        external_data: Writes the weights to ``model.data`` (ONNX external data, each weight
            once for every graph) whatever the size; automatic above ``external_data_threshold``.
        external_data_threshold: The graph size, in bytes, above which weights go to ``model.data``.
        progress: called with a line as each stage starts (``"exporting the train graph (1/4)"``).

    Returns:
        The paths, names, exporter, repairs and warnings of the export.

    Raises:
        ExportError: Unsupported opset, bad names or dimensions, the exporter failed, a dynamic
            dimension was specialised, the inference graph still drops out, the train graph
            disagrees with PyTorch, or the files cannot be written.

    Example:
        >>> export_pair(model, (torch.randn(2, 3, 32, 32),), Path("out")).train_path.name
        'model.train.onnx'
    """
    start = time.perf_counter()
    _check_arguments(opset, train_graph, exporter)
    inputs = as_input_tuple(example_inputs, "example_inputs", ExportError)
    out_dir = Path(out_dir)
    say = _counted(progress, 3 + mc_dropout + verify)
    with collector_paused(), torch_numerics("cpu"), WeightTable() as table:
        copy = export_copy(model) if exporter == "dynamo" else None  # for every twin, and the names
        names = _graph_names(model, inputs, input_names, output_names, copy)
        dims = _dynamic_dims(inputs, names.inputs, dynamic_batch, dynamic_dims)
        graphs, used, repairs, caught, fallback = _export_graphs(
            model, inputs, names, dims, opset, exporter, train_graph, mc_dropout, table, say, copy
        )
        external = external_data or any(
            graph_bytes(g) > external_data_threshold for g in graphs.values()
        )

        def verify_staged(staging: Path) -> None:
            say("checking the train graph against PyTorch train mode")
            _verify_written_train_graph(model, inputs, staging / TRAIN_FILE)

        say(f"writing {' and '.join(graphs)}")
        data_path = _write_atomically(out_dir, graphs, external, verify_staged if verify else None)
    train = graphs[TRAIN_FILE]
    notes = fallback + _export_notes(model, names, train, mc_dropout)
    version = f"torch {torch.__version__}"
    return ExportResult(
        train_path=out_dir / TRAIN_FILE, infer_path=out_dir / INFER_FILE, opset=opset,
        exporter=used, input_names=tuple(names.inputs), output_names=tuple(names.outputs),
        dynamic_batch=dynamic_batch, repairs=tuple(repairs), notes=tuple(notes), warnings=tuple(caught),
        seconds=time.perf_counter() - start, data_path=data_path,
        train_only_outputs=tuple(names.train_only), dynamic_dims=dims,
        graph_exporters={name: f"{used} ({version})" for name in graphs},
        mc_path=out_dir / MC_FILE if mc_dropout else None,
    )
