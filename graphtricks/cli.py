"""The ``graphtricks`` command line: a thin typer layer over the library.

User errors print one red line on stderr and exit 1 (typer's usage errors exit 2); a
traceback is shown only with ``--verbose``.
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from contextlib import contextmanager, nullcontext
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

try:  # typer >= 0.25 vendors click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer
    from click import exceptions as click_exceptions

from graphtricks.errors import GraphtricksError, PassError, SpecError
from graphtricks.loading import load_model, load_weights, parse_model_args
from graphtricks.passes import PASSES, GraphtricksPass, candidate_blocks, pass_from_config
from graphtricks.passes.dropout import DROPOUT_KINDS
from graphtricks.recipe import read_recipe
from graphtricks.shapes import DTYPES, make_example_inputs, parse_input_shapes

app = typer.Typer(
    name="graphtricks",
    help="Apply classic training techniques to an existing PyTorch model with torch.fx, and prove it deploys.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

DropoutKind = Enum("DropoutKind", {k: k for k in DROPOUT_KINDS}, type=str)
InputDtype = Enum("InputDtype", {k: k for k in DTYPES}, type=str)
Shortcut = Enum("Shortcut", {k: k for k in ("auto", "identity", "pad", "conv")}, type=str)
PostAct = Enum("PostAct", {k: k for k in ("none", "relu")}, type=str)
Gate = Enum("Gate", {k: k for k in ("none", "zero")}, type=str)
LnOver = Enum("LnOver", {k: k for k in ("c", "chw")}, type=str)
InitScheme = Enum(
    "InitScheme", {k: k for k in ("auto", "xavier-uniform", "xavier-normal", "he-uniform", "he-normal", "orthogonal")}, type=str
)
Fan = Enum("Fan", {k: k for k in ("fan_in", "fan_out")}, type=str)
Device = Enum("Device", {k: k for k in ("cpu", "cuda", "meta")}, type=str)

# -- shared options --------------------------------------------------------------------
InputShapeOpt = Annotated[
    Optional[str], typer.Option("--input-shape", help="Example input shape, e.g. 8,3,32,32; several inputs: 8,16;8,16.")
]
InputDtypeOpt = Annotated[
    Optional[InputDtype],
    typer.Option("--input-dtype", help="dtype of the random example inputs (default float32; int64 token ids for text models)."),
]
DeviceOpt = Annotated[
    Device, typer.Option("--device", help="Where to build and capture the model; meta plans without allocating weights.")
]
ModelArgOpt = Annotated[
    Optional[list[str]], typer.Option("--model-arg", help="key=value passed to the model's class or factory (repeatable).")
]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="State dict to load: .safetensors, or .pt read weights-only.")]
TrustPickleOpt = Annotated[
    bool, typer.Option("--trust-pickle", help="Allow unpickling a whole-model .pt (unpickling runs arbitrary code).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace a non-empty --out folder.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks of errors.")]


@contextmanager
def _user_errors(verbose: bool):
    """Turn library errors into one red line and exit code 1."""
    try:
        yield
    except GraphtricksError as e:
        if verbose:
            traceback.print_exc()
        err.print(f"[red]error:[/red] {e}", markup=True, highlight=False)
        raise typer.Exit(code=1) from None
    except typer.Exit:
        raise
    except Exception as e:
        if verbose:
            traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        err.print(
            f"[red]internal error:[/red] {type(e).__name__}: {first} (rerun with --verbose for the traceback)",
            markup=True,
            highlight=False,
        )
        raise typer.Exit(code=1) from None


def _status(message: str, quiet: bool):
    """A spinner on stderr for long work, only where a person is watching."""
    return err.status(message) if not quiet and err.is_terminal else nullcontext()


def _warn(messages: list[str], as_json: bool) -> None:
    if not as_json:
        for m in dict.fromkeys(messages):
            err.print(f"[yellow]warning:[/yellow] {m}", markup=True, highlight=False)


def _load_source(
    spec: str,
    input_shape: str | None,
    input_dtype: str | None,
    model_args: list[str] | None,
    weights: Path | None,
    trust_pickle: bool,
    device: str = "cpu",
):
    """The model a SPEC or saved DIR names, its example inputs, its source record, prior passes.

    Text models (a Hugging Face config with a ``vocab_size``) get int64 token ids below the
    vocabulary size unless ``--input-dtype`` says otherwise.
    """
    from graphtricks.saving import is_saved_model, load_saved

    if is_saved_model(spec):
        if device != "cpu":
            raise SpecError("a saved folder is rebuilt on the CPU; --device applies to model specs")
        saved = load_saved(spec, trust_pickle=trust_pickle)
        source = dict(saved.recipe.source)
        inputs = saved.example_inputs
        if input_shape:
            shapes = parse_input_shapes(input_shape)
            dtype = input_dtype or source.get("input_dtype", "float32")
            high = source.get("token_high", 100)
            source.update(input_shapes=[list(s) for s in shapes], input_dtype=dtype)
            inputs = make_example_inputs(shapes, dtype, high=high)
        if weights:
            load_weights(saved.model, weights)
        return saved.model, inputs, source, list(saved.recipe.passes)
    if Path(spec).is_dir():
        raise SpecError(f"{spec} is a folder but not a graphtricks model (no recipe.toml)")
    if ":" not in spec and not Path(spec).exists() and ("/" in spec or "\\" in spec):
        raise SpecError(f"{spec} does not exist (give a model spec file.py:Name, package.module:Name, or a saved folder)")
    if not input_shape:
        raise SpecError("give the example input shape with --input-shape, e.g. --input-shape 8,3,32,32")
    if device == "meta" and weights:
        raise SpecError("--device meta builds the model without weights; drop --weights")
    shapes = parse_input_shapes(input_shape)
    kwargs = parse_model_args(model_args)
    with torch.device(device):
        model = load_model(spec, kwargs, trust_pickle=trust_pickle)
    if weights:
        load_weights(model, weights)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    dtype = input_dtype or ("int64" if isinstance(vocab, int) else "float32")
    high = vocab if isinstance(vocab, int) and dtype.startswith("int") else 100
    source: dict[str, Any] = {"spec": spec, "input_shapes": [list(s) for s in shapes], "input_dtype": dtype}
    if high != 100:
        source["token_high"] = high
    if kwargs:
        source["model_args"] = kwargs
    if trust_pickle:
        source["trust_pickle"] = True
    return model, make_example_inputs(shapes, dtype, device=device, high=high), source, []


def _flag_passes(
    *,
    residual: list[str],
    residual_span: list[str],
    shortcut: str,
    shortcut_norm: bool,
    post_act: str,
    gate: str,
    bn_to_ln: bool,
    ln_over: str,
    dropout: float | None,
    dropout_kind: str,
    init: str | None,
    seed: int,
    keep_bias: bool,
    fan: str,
    zero_init_residual: bool,
    include_frozen: bool,
    include: list[str],
    exclude: list[str],
) -> list[GraphtricksPass]:
    """Passes named by flags, in the order that composes well: structure, norms, dropout, init."""
    select = {"include": tuple(include), "exclude": tuple(exclude)}
    configs: list[dict[str, Any]] = []
    if residual or residual_span:
        configs.append(
            {"pass": "residual", "blocks": list(residual), "spans": list(residual_span), "shortcut": shortcut,
             "shortcut_norm": shortcut_norm, "post_act": post_act, "gate": gate}
        )
    if bn_to_ln:
        configs.append({"pass": "bn_to_ln", "over": ln_over})
    if dropout is not None:
        configs.append({"pass": "dropout", "p": dropout, "kind": dropout_kind})
    if init is not None:
        configs.append(
            {"pass": "init", "scheme": init, "seed": seed, "keep_bias": keep_bias, "fan": fan,
             "zero_init_residual": zero_init_residual, "include_frozen": include_frozen}
        )
    passes = []
    for config in configs:
        if config["pass"] not in PASSES:
            raise PassError(f"pass {config['pass']!r} is not available in this build of graphtricks")
        passes.append(pass_from_config({**config, **{k: v for k, v in select.items() if v}}))
    return passes


def _changes_table(report) -> Table:
    table = Table(title="changes", show_lines=False)
    for column in ("pass", "where", "action", "what"):
        table.add_column(column, overflow="fold")
    for c in report.changes:
        table.add_row(c.pass_name, c.where, c.action, c.what)
    return table


@app.command()
def rewrite(
    spec: Annotated[str, typer.Argument(help="Model spec (file.py:Name, pkg.module:Name, tv:/timm:/hf:NAME) or a saved DIR.")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Folder to write the rewritten model to.")] = None,
    input_shape: InputShapeOpt = None,
    input_dtype: InputDtypeOpt = None,
    device: DeviceOpt = Device.cpu,
    model_arg: ModelArgOpt = None,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    dropout: Annotated[Optional[float], typer.Option("--dropout", help="Insert dropout with this p after activations.")] = None,
    dropout_kind: Annotated[DropoutKind, typer.Option("--dropout-kind", help="element or channel dropout.")] = DropoutKind.element,
    residual: Annotated[Optional[list[str]], typer.Option("--residual", help="Wrap blocks whose qualified name matches (repeatable; * and ? stop at dots, ** crosses them).")] = None,
    residual_span: Annotated[Optional[list[str]], typer.Option("--residual-span", help="Wrap a node span FIRST:LAST (or REGION/FIRST:LAST) of a traced region.")] = None,
    shortcut: Annotated[Shortcut, typer.Option("--shortcut", help="Shortcut kind.")] = Shortcut.auto,
    shortcut_norm: Annotated[bool, typer.Option("--shortcut-norm", help="BatchNorm after a 1x1 conv shortcut.")] = False,
    post_act: Annotated[PostAct, typer.Option("--post-act", help="Activation after the sum.")] = PostAct.none,
    gate: Annotated[Gate, typer.Option("--gate", help="zero: a learnable scalar gate on the shortcut, starting at 0.")] = Gate.none,
    bn_to_ln: Annotated[bool, typer.Option("--bn-to-ln", help="Replace BatchNorm with LayerNorm.")] = False,
    ln_over: Annotated[LnOver, typer.Option("--ln-over", help="c: over channels per position; chw: over C,H,W.")] = LnOver.c,
    init: Annotated[Optional[InitScheme], typer.Option("--init", help="Re-initialise weights with this scheme.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for --init.")] = 0,
    keep_bias: Annotated[bool, typer.Option("--keep-bias", help="--init keeps biases instead of zeroing them.")] = False,
    fan: Annotated[Fan, typer.Option("--fan", help="Fan mode for He initialisation.")] = Fan.fan_in,
    zero_init_residual: Annotated[bool, typer.Option("--zero-init-residual", help="Last norm of each residual block starts at 0.")] = False,
    include_frozen: Annotated[bool, typer.Option("--include-frozen", help="--init also re-initialises frozen parameters.")] = False,
    include: Annotated[Optional[list[str]], typer.Option("--include", help="Only edit places whose qualified name matches (repeatable).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Never edit places matching this glob (repeatable).")] = None,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="TOML recipe with [[passes]] to apply (before flag passes).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; write nothing.")] = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Rewrite a model with passes and save it (weights, recipe, report, code)."""
    from graphtricks.rewrite import rewrite as run_rewrite
    from graphtricks.saving import check_output_dir, save

    with _user_errors(verbose):
        if out_dir is None and not dry_run:
            raise GraphtricksError("give --out DIR to write the rewritten model, or --dry-run to only see the plan")
        if device is Device.meta and not dry_run:
            raise GraphtricksError("a model on the meta device has no weights to write: add --dry-run to plan the rewrite")
        if out_dir is not None and not dry_run:
            check_output_dir(out_dir, force)
        planned = read_recipe(recipe).build_passes() if recipe else []
        planned += _flag_passes(
            residual=residual or [], residual_span=residual_span or [], shortcut=shortcut.value,
            shortcut_norm=shortcut_norm, post_act=post_act.value, gate=gate.value, bn_to_ln=bn_to_ln,
            ln_over=ln_over.value, dropout=dropout, dropout_kind=dropout_kind.value,
            init=init.value if init else None, seed=seed, keep_bias=keep_bias, fan=fan.value,
            zero_init_residual=zero_init_residual, include_frozen=include_frozen,
            include=include or [], exclude=exclude or [],
        )
        with _status("loading and capturing the model…", as_json):
            model, inputs, source, prior = _load_source(
                spec, input_shape, input_dtype.value if input_dtype else None, model_arg, weights, trust_pickle, device.value
            )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = run_rewrite(model, planned, inputs, inplace=True)
        messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        if not planned:
            messages.insert(0, "no pass requested (see --help); the model is written unchanged")
        written = None
        if not dry_run:
            with _status(f"writing {out_dir}…", as_json):
                written = save(result, out_dir, source, force=force, prior_passes=prior)
        if as_json:
            payload = {"out": str(written) if written else None, "dry_run": dry_run, "warnings": messages,
                       "recipe": prior + result.recipe(), "report": result.report.to_dict()}
            print(json.dumps(payload, indent=2, default=str))
            return
        _warn(messages, as_json)
        if result.report.changes:
            out.print(_changes_table(result.report))
        counts = ", ".join(f"{k}: {v}" for k, v in result.report.changes_by_pass().items()) or "no passes"
        action = "would write" if dry_run else "wrote"
        target = f" {action} {out_dir}" if out_dir is not None and not dry_run else (" (dry run: nothing written)" if dry_run else "")
        out.print(f"{len(result.report.changes)} changes ({counts}); traced {result.report.traced_fraction:.0%};{target}")


def _render_region(tree: Tree, region: dict) -> None:
    label = region["path"] or "<root>"
    kind = "[green]traced[/green]" if region["kind"] == "traced" else "[yellow]opaque[/yellow]"
    extra = f" ({region['nodes']} nodes)" if "nodes" in region else ""
    reason = f" — {region['reason']}" if region.get("reason") else ""
    branch = tree.add(f"{label} [dim]{region['type']}[/dim] {kind}{extra}{reason}")
    for child in region["children"]:
        _render_region(branch, child)


@app.command()
def inspect(
    spec: Annotated[str, typer.Argument(help="Model spec or a saved DIR.")],
    input_shape: InputShapeOpt = None,
    input_dtype: InputDtypeOpt = None,
    device: DeviceOpt = Device.cpu,
    model_arg: ModelArgOpt = None,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Show the region tree (traced / opaque and why), activations, norms and parameters."""
    from graphtricks.inspection import summarize
    from graphtricks.rewrite import rewrite as run_rewrite

    with _user_errors(verbose):
        with _status("capturing the model…", as_json):
            model, inputs, _, prior = _load_source(
                spec, input_shape, input_dtype.value if input_dtype else None, model_arg, weights, trust_pickle, device.value
            )
            result = run_rewrite(model, [], inputs, inplace=True)
        summary = summarize(result.tree)
        summary["candidate_blocks"] = candidate_blocks(result.tree, result.example_inputs)
        if prior:
            summary["recipe"] = prior
        if as_json:
            print(json.dumps(summary, indent=2, default=str))
            return
        out.print(
            f"[bold]{summary['model']}[/bold]: {summary['parameters']:,} parameters "
            f"({summary['trainable_parameters']:,} trainable); traced {summary['traced_fraction']:.0%} "
            f"in {summary['regions']['traced']} traced / {summary['regions']['opaque']} opaque regions"
        )
        tree = Tree("regions")
        _render_region(tree, summary["tree"])
        out.print(tree)
        for title in ("activations", "activation_forms", "norms"):
            items = ", ".join(f"{k} ×{v}" for k, v in summary[title].items()) or "none"
            out.print(f"{title.replace('_', ' ')}: {items}")
        if summary["candidate_blocks"]:
            table = Table(title="candidate blocks for --residual")
            for column in ("block", "type", "input", "output", "auto shortcut"):
                table.add_column(column)
            for block in summary["candidate_blocks"]:
                table.add_row(
                    block["name"], block.get("type", ""), str(block.get("input_shape")), str(block.get("output_shape")),
                    str(block.get("shortcut") or "none fits") + (" (wrapped)" if block.get("wrapped") else ""),
                )
            out.print(table)


OnnxDevice = Enum("OnnxDevice", {k: k for k in ("auto", "cpu", "cuda")}, type=str)


@app.command()
def export(
    spec: Annotated[str, typer.Argument(help="A saved DIR (files go into it), or a model spec (with --out).")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="For a SPEC: folder receiving the saved model and ONNX files.")] = None,
    input_shape: InputShapeOpt = None,
    input_dtype: InputDtypeOpt = None,
    model_arg: ModelArgOpt = None,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (14-20).")] = 18,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Make dimension 0 symbolic.")] = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Export model.train.onnx and model.infer.onnx (train-mode and inference graphs)."""
    from graphtricks.onnx import MAX_OPSET, MIN_OPSET, export_pair
    from graphtricks.rewrite import rewrite as run_rewrite
    from graphtricks.saving import check_output_dir, is_saved_model, save

    with _user_errors(verbose):
        if not MIN_OPSET <= opset <= MAX_OPSET:
            raise GraphtricksError(f"opset {opset} is not supported; choose {MIN_OPSET} to {MAX_OPSET}")
        saved = is_saved_model(spec)
        if not saved and out_dir is None:
            raise GraphtricksError("exporting a model spec needs --out DIR (it receives the saved model and the ONNX files)")
        if out_dir is not None and not (saved and Path(out_dir).resolve() == Path(spec).resolve()):
            check_output_dir(out_dir, force)
        with _status("loading the model…", as_json):
            model, inputs, source, prior = _load_source(
                spec, input_shape, input_dtype.value if input_dtype else None, model_arg, weights, trust_pickle
            )
        target = Path(spec) if saved and out_dir is None else Path(out_dir)
        if target != Path(spec) or not saved:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = run_rewrite(model, [], inputs, inplace=True)
            save(result, target, source, force=force, prior_passes=prior)
            model = result.model
        with _status(f"exporting to {target}…", as_json):
            exported = export_pair(model, inputs, target, opset=opset, dynamic_batch=dynamic_batch)
        if as_json:
            print(json.dumps(exported.to_dict(), indent=2, default=str))
            return
        _warn(list(exported.warnings), as_json)
        for note in exported.notes:
            err.print(f"[dim]note:[/dim] {note}", markup=True, highlight=False)
        out.print(f"wrote {exported.train_path} and {exported.infer_path} (opset {exported.opset}, {exported.seconds:.1f}s)")


def _read_npz(path: Path) -> list[tuple]:
    """One input set from an ``.npz`` (arrays in file order), refusing pickled objects."""
    import numpy as np

    from graphtricks.errors import ValidationError

    if not path.is_file():
        raise ValidationError(f"inputs file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = [torch.from_numpy(np.array(data[name])) for name in data.files]
    except Exception as e:
        raise ValidationError(f"cannot read {path} as .npz arrays: {e}") from e
    if not arrays:
        raise ValidationError(f"{path} holds no arrays")
    return [tuple(arrays)]


@app.command()
def validate(
    folder: Annotated[Path, typer.Argument(help="A folder written by `graphtricks export`.")],
    device: Annotated[OnnxDevice, typer.Option("--device", help="auto: CUDA when onnxruntime-gpu and a GPU are present.")] = OnnxDevice.auto,
    atol: Annotated[Optional[float], typer.Option("--atol", help="Absolute tolerance (default by dtype and device).")] = None,
    rtol: Annotated[Optional[float], typer.Option("--rtol", help="Relative tolerance (default by dtype and device).")] = None,
    inputs_file: Annotated[Optional[Path], typer.Option("--inputs", help="Extra inputs: an .npz with one array per model input.")] = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Check both ONNX graphs against PyTorch and each other; exit 1 when a check fails."""
    from graphtricks.onnx import snapshot_model, validate_pair
    from graphtricks.saving import load_saved

    with _user_errors(verbose):
        extra = _read_npz(inputs_file) if inputs_file else None
        with _status("rebuilding the model…", as_json):
            saved = load_saved(folder)
        with _status("running ONNX Runtime and PyTorch…", as_json):
            report = validate_pair(
                saved.model, saved.example_inputs, folder, device=device.value, atol=atol, rtol=rtol,
                extra_inputs=extra, baseline=snapshot_model(saved.model),
            )
        if as_json:
            print(json.dumps(report.to_dict(), indent=2, default=str))
        else:
            table = Table(title=f"ONNX validation of {folder}")
            for column in ("check", "graph", "provider", "output", "seed", "max abs", "max rel", "ok"):
                table.add_column(column, overflow="fold")
            for c in report.checks:
                table.add_row(
                    c.name, c.graph or "", c.provider or "", c.output or "", "" if c.seed is None else str(c.seed),
                    _fmt(c.max_abs), _fmt(c.max_rel), "[green]yes[/green]" if c.passed else "[red]NO[/red]",
                )
            out.print(table)
            for note in report.notes:
                err.print(f"[dim]note:[/dim] {note}", markup=True, highlight=False)
            for c in report.failures:
                err.print(f"[red]failed:[/red] {c.name}: {c.message}", markup=True, highlight=False)
            out.print(report.summary())
        if not report.passed:
            raise typer.Exit(code=1)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.2e}" if isinstance(value, float) else str(value)


def main() -> None:
    """Console-script entry point: usage errors are one line too (exit code 2)."""
    try:
        code = app(standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError:
        code = 0  # typer has printed the help while building this exception
    except click_exceptions.UsageError as e:
        hint = f" (see `graphtricks {e.ctx.info_name} --help`)" if e.ctx and e.ctx.parent else " (see `graphtricks --help`)"
        err.print(f"[red]error:[/red] {e.format_message()}{hint}", markup=True, highlight=False)
        code = 2
    except typer.Abort:
        err.print("aborted", highlight=False)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
