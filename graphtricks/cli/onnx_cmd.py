"""``graphtricks export`` and ``graphtricks validate``: the train-mode and inference ONNX graphs."""

from __future__ import annotations

import json
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from graphtricks.cli.common import (
    ForceOpt,
    InputDtypeOpt,
    InputShapeOpt,
    JsonOpt,
    ModelArgOpt,
    NamedInputOpt,
    PretrainedOpt,
    TrustPickleOpt,
    VerboseOpt,
    WeightsOpt,
    err,
    load_source,
    note,
    out,
    print_table,
    progress,
    status,
    table,
    user_errors,
    warn,
)
from graphtricks.errors import GraphtricksError, ValidationError

OnnxDevice = Enum("OnnxDevice", {k: k for k in ("auto", "cpu", "cuda")}, type=str)
TrainGraph = Enum("TrainGraph", {k: k for k in ("portable", "standard")}, type=str)
Exporter = Enum("Exporter", {k: k for k in ("dynamo", "torchscript")}, type=str)


def _parse_dynamic_dims(specs: list[str] | None) -> dict[str, list[int]]:
    """``INPUT:DIM`` options as ``{input: [dims]}``; a malformed one is a one-line error."""
    dims: dict[str, list[int]] = {}
    for spec in specs or []:
        name, sep, dim = spec.rpartition(":")
        try:
            value = int(dim)
        except ValueError:
            value = None
        if not sep or not name or value is None:
            raise GraphtricksError(f"--dynamic-dim {spec!r}: write INPUT:DIM, e.g. input_ids:1 (input names as in --input)")
        dims.setdefault(name, []).append(value)
    return dims


def export(
    spec: Annotated[str, typer.Argument(metavar="DIR|SPEC", help="A saved DIR (files go into it), or a model spec (with --out).")],
    out_dir: Annotated[Path | None, typer.Option("--out", metavar="DIR", help="For a SPEC: folder receiving the saved model and ONNX files.")] = None,
    input_shape: InputShapeOpt = None,
    input_dtype: InputDtypeOpt = None,
    named_input: NamedInputOpt = None,
    model_arg: ModelArgOpt = None,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = False,
    trust_pickle: TrustPickleOpt = False,
    opset: Annotated[int, typer.Option("--opset", metavar="N", help="ONNX opset (14-20).")] = 18,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Make dimension 0 symbolic.")] = False,
    dynamic_dim: Annotated[list[str] | None, typer.Option("--dynamic-dim", metavar="INPUT:DIM", help="Make dimension DIM of input INPUT symbolic (repeatable; names as in --input, e.g. input_ids:1).")] = None,
    exporter: Annotated[Exporter, typer.Option("--exporter", help="dynamo: torch.export (default; TorchScript for a model it cannot capture, with a note); torchscript: the legacy exporter.")] = Exporter.dynamo,
    mc_dropout: Annotated[bool, typer.Option("--mc-dropout", help="Also write model.mc.onnx: eval mode with every dropout on (Monte Carlo dropout).")] = False,
    train_graph: Annotated[TrainGraph, typer.Option("--train-graph", help="portable: dropout and BatchNorm as primitive ops any runtime runs as written (running stats as updated.* outputs); standard: ONNX Dropout and train-mode BatchNormalization.")] = TrainGraph.portable,
    external_data: Annotated[bool, typer.Option("--external-data", help="Write the weights once, to model.data beside both graphs (ONNX external data); automatic for graphs over 2 GiB.")] = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Export model.train.onnx and model.infer.onnx (train-mode and inference graphs), and with --mc-dropout model.mc.onnx.

    Example:

    \b
        graphtricks export out/cnn
    """
    from graphtricks.io.files import staged_folder
    from graphtricks.io.precheck import check_output_dir, check_spec_path, is_saved_model

    with user_errors(verbose):
        # what needs no torch first: a wrong path answers at once
        check_spec_path(spec)
        saved = is_saved_model(spec)
        if not saved and out_dir is None:
            raise GraphtricksError(f"exporting the model spec {spec} needs --out DIR (it receives the saved model and"
                                   " the ONNX files)")
        options = {"dynamic_dims": _parse_dynamic_dims(dynamic_dim), "exporter": exporter.value,
                   "mc_dropout": mc_dropout}
        in_place = saved and (out_dir is None or Path(out_dir).resolve() == Path(spec).resolve())
        if not in_place:
            check_output_dir(out_dir, force)
        target = Path(spec) if in_place else Path(out_dir)
        if in_place:  # the ONNX files appear in the folder together, or not at all
            _export(spec, target, target, input_shape, input_dtype, named_input, model_arg, weights, pretrained,
                    trust_pickle, opset, dynamic_batch, train_graph, external_data, force, as_json, save_first=False,
                    options=options)
        else:  # the saved model and its graphs appear together, or nothing does
            with staged_folder(target) as folder:
                _export(spec, folder, target, input_shape, input_dtype, named_input, model_arg, weights,
                        pretrained, trust_pickle, opset, dynamic_batch, train_graph, external_data, force, as_json,
                        save_first=True, options=options)


def _export(spec, folder: Path, target: Path, input_shape, input_dtype, named_input, model_arg, weights, pretrained,
            trust_pickle, opset, dynamic_batch, train_graph, external_data, force, as_json, save_first: bool,
            options: dict) -> None:
    """Export into ``folder`` (saving the model there first when ``save_first``); report as ``target``.

    ``options``: ``dynamic_dims``, ``exporter`` and ``mc_dropout`` for ``export_pair``."""
    from graphtricks.io.folder import save
    from graphtricks.io.inputs import positional_inputs
    from graphtricks.onnx import MAX_OPSET, MIN_OPSET, export_pair
    from graphtricks.rewriting import rewrite as run_rewrite

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise GraphtricksError(f"opset {opset} is not supported; choose {MIN_OPSET} to {MAX_OPSET}")
    with status("loading the model…", as_json):
        model, inputs, source, prior, keywords = load_source(spec, input_shape, input_dtype, model_arg, weights,
                                                             trust_pickle, named_inputs=named_input,
                                                             pretrained=pretrained)
    if save_first:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run_rewrite(model, [], inputs, example_kwargs=keywords, inplace=True)
        save(result, folder, source, force=force, prior_passes=prior)
        model = result.model
    # keyword inputs go in their parameter places, and name the graph inputs
    inputs, names = positional_inputs(model.forward, inputs, keywords) if keywords else (inputs, None)
    with progress(f"exporting to {target}…", as_json) as say:
        exported = export_pair(
            model, inputs, folder, opset=opset, dynamic_batch=dynamic_batch, train_graph=train_graph.value,
            external_data=external_data, input_names=names, progress=say, **options,
        )
    if as_json:
        print(json.dumps({**exported.to_dict(), **_paths_in(exported, folder, target)}, indent=2, default=str))
        return
    warn(list(exported.warnings), as_json)
    note(exported.notes)
    paths = _paths_in(exported, folder, target)
    data = f" with weights in {Path(paths['data_path']).name}" if paths.get("data_path") else ""
    mc = f" and {paths['mc_path']}" if paths.get("mc_path") else ""
    out.print(f"wrote {paths['train_path']} and {paths['infer_path']}{mc}{data} (opset {exported.opset},"
              f" {exported.exporter} exporter, {exported.seconds:.1f}s)")


def _paths_in(exported, folder: Path, target: Path) -> dict[str, str]:
    """The export's file paths as they will be once ``folder`` is renamed to ``target``."""
    paths = {"train_path": exported.train_path, "infer_path": exported.infer_path, "data_path": exported.data_path,
             "mc_path": exported.mc_path}
    return {k: str(target / Path(v).name) for k, v in paths.items() if v is not None}


def _read_npz(path: Path) -> list:
    """One input set from an ``.npz``, refusing pickled objects: by name (``np.savez(f, x=...)``,
    matched to the graph inputs), or by position where the arrays are unnamed
    (``np.savez(f, a, b)``: ``arr_0``, ``arr_1``, in that order)."""
    import re

    import numpy as np
    import torch

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: torch.from_numpy(np.array(data[name])) for name in data.files}
    except Exception as e:
        raise ValidationError(f"cannot read {path} as .npz arrays: {e}") from e
    if not arrays:
        raise ValidationError(f"{path} holds no arrays")
    if all(re.fullmatch(r"arr_\d+", name) for name in arrays):
        return [tuple(arrays[name] for name in sorted(arrays, key=lambda n: int(n[4:])))]
    return [arrays]


def validate(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="A folder written by `graphtricks export`.")],
    device: Annotated[OnnxDevice, typer.Option("--device", metavar="auto|cpu|cuda", help="auto: CUDA when onnxruntime-gpu and a GPU are present.")] = OnnxDevice.auto,
    atol: Annotated[float | None, typer.Option("--atol", metavar="X", help="Absolute tolerance (default by dtype and device).")] = None,
    rtol: Annotated[float | None, typer.Option("--rtol", metavar="X", help="Relative tolerance (default by dtype and device).")] = None,
    inputs_file: Annotated[Path | None, typer.Option("--inputs", metavar="FILE", help="Extra inputs: an .npz with one array per graph input, named after it (or unnamed, in input order).")] = None,
    as_json: JsonOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="List every check, and show tracebacks of errors.")] = False,
) -> None:
    """Check both ONNX graphs against PyTorch and each other; exit 1 when a check fails.

    Example:

    \b
        graphtricks validate out/cnn
    """
    from graphtricks.io.precheck import check_onnx_folder

    with user_errors(verbose):
        check_onnx_folder(folder)  # before torch: a wrong path answers at once
        if inputs_file is not None and not inputs_file.is_file():
            raise ValidationError(f"inputs file {inputs_file} does not exist")

        from graphtricks.io.folder import load_saved
        from graphtricks.io.inputs import positional_inputs
        from graphtricks.onnx import digest_model, validate_pair

        extra = _read_npz(inputs_file) if inputs_file else None
        with status("rebuilding the model…", as_json):
            saved = load_saved(folder)
        example, _ = positional_inputs(saved.model.forward, saved.example_inputs, saved.example_kwargs)
        with progress("running ONNX Runtime and PyTorch…", as_json) as say:
            report = validate_pair(
                saved.model, example, folder, device=device.value, atol=atol, rtol=rtol,
                extra_inputs=extra, baseline=digest_model(saved.model), progress=say,
            )
        if as_json:
            print(json.dumps(report.to_dict(), indent=2, default=str))
        else:
            print_table(_checks_table(report, folder, every_row=verbose))
            note(report.notes)
            for c in report.failures:
                err.print(f"[red]failed:[/red] {c.name}: {c.message}", markup=True, highlight=False)
            out.print(report.summary())
        if not report.passed:
            raise typer.Exit(code=1)


def _checks_table(report, folder: Path, every_row: bool) -> Table:
    """One row per check family (counts, worst figures); every row with ``--verbose``."""
    if every_row:
        made = table(f"ONNX validation of {folder}", {"check": "name", "graph": "name", "provider": "name",
                     "output": "name", "seed": "name", "max\nabs": "name", "max\nrel": "name", "ok": "name"})
        for c in report.checks:
            made.add_row(
                c.name, c.graph or "", _provider(c.provider), c.output or "", "" if c.seed is None else str(c.seed),
                _fmt(c.max_abs), _fmt(c.max_rel), "[green]yes[/green]" if c.passed else "[red]NO[/red]",
            )
        return made
    families: dict[str, list] = {}
    for c in report.checks:
        families.setdefault(c.name, []).append(c)
    made = table(f"ONNX validation of {folder}", {"check": "name", "passed": "name", "graphs": "text",
                 "provider": "text", "worst\nabs": "name", "worst\nrel": "name"})
    for name, checks in families.items():
        passed = sum(c.passed for c in checks)
        worst_abs = max((c.max_abs for c in checks if c.max_abs is not None), default=None)
        worst_rel = max((c.max_rel for c in checks if c.max_rel is not None), default=None)
        count = f"[green]{passed}/{len(checks)}[/green]" if passed == len(checks) else f"[red]{passed}/{len(checks)} ✗[/red]"
        made.add_row(
            name, count, ", ".join(dict.fromkeys(c.graph for c in checks if c.graph)),
            ", ".join(dict.fromkeys(_provider(c.provider) for c in checks if c.provider)), _fmt(worst_abs),
            _fmt(worst_rel),
        )
    made.caption = "one row per check family (✗: some failed); --verbose lists every check, --json gives them all"
    return made


def _provider(name: str | None) -> str:
    """An execution provider as the tables show it: ``CPU`` for ``CPUExecutionProvider``."""
    return (name or "").replace("ExecutionProvider", "")


def _fmt(value) -> str:
    """A table cell: blank for None, floats in short scientific notation."""
    return "" if value is None else f"{value:.2e}" if isinstance(value, float) else str(value)
