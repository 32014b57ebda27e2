"""``graphtricks rewrite``: apply passes named by flags or a recipe, and save the result."""

from __future__ import annotations

import contextlib
import json
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from graphtricks.cli.common import (
    Device,
    DeviceOpt,
    choices,
    ForceOpt,
    InputDtypeOpt,
    InputShapeOpt,
    JsonOpt,
    ModelArgOpt,
    PretrainedOpt,
    NamedInputOpt,
    TrustPickleOpt,
    WeightsOpt,
    load_source,
    out,
    print_table,
    progress,
    status,
    table,
    user_errors,
    warn,
)
from graphtricks.errors import GraphtricksError, PassError, RecipeError

# the pass's own tables (passes.dropout.DROPOUT_KINDS, ...) import torch: their names are
# repeated here so --help stays fast; tests/cli checks that they agree
DropoutKind = Enum("DropoutKind", {k: k for k in ("element", "channel")}, type=str)
Shortcut = Enum("Shortcut", {k: k for k in ("auto", "identity", "pad", "conv")}, type=str)
PostAct = Enum("PostAct", {k: k for k in ("none", "relu")}, type=str)
Gate = Enum("Gate", {k: k for k in ("none", "zero", "zero-branch")}, type=str)
LnOver = Enum("LnOver", {k: k for k in ("c", "chw")}, type=str)
InitScheme = Enum(
    "InitScheme", {k: k for k in ("auto", "xavier-uniform", "xavier-normal", "he-uniform", "he-normal", "orthogonal")}, type=str
)
Fan = Enum("Fan", {k: k for k in ("fan_in", "fan_out")}, type=str)


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
    dropout_after: list[str],
    dropout_gates: bool,
    dropout_constants: bool = False,
    init: str | None,
    seed: int,
    keep_bias: bool,
    fan: str,
    zero_init_residual: bool,
    include_frozen: bool,
    include: list[str],
    exclude: list[str],
) -> list:
    """Passes named by flags, in the order that composes well: structure, norms, dropout, init."""
    from graphtricks.passes import PASSES, pass_from_config

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
        entry: dict[str, Any] = {"pass": "dropout", "p": dropout, "kind": dropout_kind}
        if dropout_after:
            entry["activations"] = list(dropout_after)
        if dropout_gates:
            entry["gates"] = True
        if dropout_constants:
            entry["constants"] = True
        configs.append(entry)
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


def _check_p(value: float | None) -> float | None:
    """``--dropout`` is checked while parsing (exit 2), before any model loads."""
    if value is not None and not 0.0 <= value < 1.0:
        raise typer.BadParameter(f"{value:g} is not a dropout probability: give a number in [0, 1), e.g. 0.1")
    return value


LONG_TABLE = 30  # more changes than this are shown grouped (--verbose lists every one)
DRIFT_UNIT = ("drift = ‖y_new − y_old‖ / ‖y_old‖ of the swapped layer's eval output on the example inputs"
              " (~: on an even sample of its positions)")


def _drift(change) -> str:
    value = change.details.get("drift") if change.details else None
    if value is None:
        return ""
    return f"~{value:.3g}" if change.details.get("drift_sampled", 1.0) < 1.0 else f"{value:.3g}"


def _changes_table(report, every_row: bool) -> tuple[Table, str | None]:
    """The report's changes, one row each; grouped by (pass, action, what) when there are many."""
    with_drift = any(_drift(c) for c in report.changes)
    if every_row or len(report.changes) <= LONG_TABLE:
        made = table("changes", {"pass": "name", "where": "name", "action": "name", "what": "text",
                                 **({"drift": "name"} if with_drift else {})})
        for c in report.changes:
            made.add_row(c.pass_name, c.where, c.action, c.what, *([_drift(c)] if with_drift else []))
        return made, DRIFT_UNIT if with_drift else None
    groups: dict[tuple, list] = {}
    for c in report.changes:
        groups.setdefault((c.pass_name, c.action, c.what), []).append(c)
    made = table("changes", {"pass": "name", "count": "name", "where": "text", "action": "name", "what": "text",
                             **({"drift\n(max)": "name"} if with_drift else {})})
    for (pass_name, action, what), changes in groups.items():
        where = changes[0].where if len(changes) == 1 else f"{changes[0].where} … {changes[-1].where}"
        drifts = [c.details["drift"] for c in changes if c.details and c.details.get("drift") is not None]
        made.add_row(pass_name, str(len(changes)), where, action, what, *([f"{max(drifts):.3g}" if drifts else ""] if with_drift else []))
    hint = f"{len(report.changes)} changes in {len(groups)} groups; --verbose lists every change, --json gives them all"
    return made, hint + (f"; {DRIFT_UNIT}" if with_drift else "")


# the CLI flag that gives each pass option a selection error can name
SELECTION_FLAGS = {"include": "--include", "exclude": "--exclude", "blocks": "--residual"}


@contextlib.contextmanager
def _selection_flags(given: dict[str, list[str]]):
    """A pattern typed on the command line that matches nothing is named by its flag."""
    from graphtricks.errors import SelectionError

    try:
        yield
    except SelectionError as e:
        flag = SELECTION_FLAGS.get(e.option)
        if flag is None or e.pattern not in given.get(e.option, ()):
            raise  # from a recipe: the library's message names the pass and its option
        raise GraphtricksError(f"{flag} {e.pattern!r} matches nothing in this model{e.hint}") from e


def _group_warnings(messages: list[str]) -> list[str]:
    """Warnings grouped by the pass that gave them (``init: ...`` lines together), order kept."""
    def key(m: str) -> str:
        head = m.split(":", 1)[0]
        return head if " " not in head else ""
    order = list(dict.fromkeys(key(m) for m in messages))
    return sorted(dict.fromkeys(messages), key=lambda m: order.index(key(m)))


def _messages(report, caught, planned: bool) -> list[str]:
    """Every warning a pass recorded (notes included), then any other library warning, grouped."""
    messages = list(report.warnings)
    messages += [str(w.message) for w in caught if issubclass(w.category, UserWarning) and str(w.message) not in messages]
    messages = _group_warnings(messages)
    if not planned:
        messages.insert(0, "no pass requested (see --help); the model is written unchanged")
    return messages


def _print_result(report, out_dir: Path | None, dry_run: bool, verbose: bool) -> None:
    """The changes table, what was left alone and why, and the closing count line."""
    if report.changes:
        changes, hint = _changes_table(report, every_row=verbose)
        print_table(changes)
        if hint:
            out.print(f"[dim]{hint}[/dim]")
    inlined = report.inlined
    if inlined:  # same computation, but these modules are not called on their own (hooks, checkpoint)
        first = ", ".join(f"{path or '<root>'} ({why})" for path, why in list(inlined.items())[:3])
        more = f" and {len(inlined) - 3} more (--json lists all)" if len(inlined) > 3 else ""
        out.print(f"[dim]{len(inlined)} module(s) stay inlined in their caller's graph: {first}{more}[/dim]")
    gates = report.skipped.get("dropout", {}).get("gates", 0)
    if gates:
        out.print(f"[dim]dropout: {gates} gate(s) left without dropout (a sigmoid whose output only scales"
                  " another tensor); --dropout-gates includes them[/dim]")
    constants = report.skipped.get("dropout", {}).get("input_independent", 0)
    if constants:
        out.print(f"[dim]dropout: {constants} activation(s) that do not depend on the inputs left without dropout"
                  " (parameters or buffers only); --dropout-constants includes them[/dim]")
    counts = ", ".join(f"{k}: {v}" for k, v in report.changes_by_pass().items()) or "no passes"
    action = "would write" if dry_run else "wrote"
    target = f" {action} {out_dir}" if out_dir is not None and not dry_run else (" (dry run: nothing written)" if dry_run else "")
    out.print(f"{len(report.changes)} changes ({counts}); traced {report.traced_fraction:.0%};{target}")


def rewrite(
    spec: Annotated[str, typer.Argument(metavar="SPEC", help="Model spec (file.py:Name, pkg.module:Name, tv:/timm:/hf:NAME) or a saved DIR.")],
    out_dir: Annotated[Path | None, typer.Option("--out", metavar="DIR", help="Folder to write the rewritten model to.")] = None,
    input_shape: InputShapeOpt = None,
    named_input: NamedInputOpt = None,
    input_dtype: InputDtypeOpt = None,
    device: DeviceOpt = Device.cpu,
    model_arg: ModelArgOpt = None,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = False,
    trust_pickle: TrustPickleOpt = False,
    dropout: Annotated[float | None, typer.Option("--dropout", metavar="P", callback=_check_p, help="Insert dropout with this p after activations.")] = None,
    dropout_kind: Annotated[DropoutKind, typer.Option("--dropout-kind", metavar=choices(DropoutKind), help="element or channel dropout.")] = DropoutKind.element,
    dropout_after: Annotated[list[str] | None, typer.Option("--dropout-after", metavar="ACTIVATION", help="Only after these activations, e.g. ReLU, GELU (repeatable; default: all).")] = None,
    dropout_gates: Annotated[bool, typer.Option("--dropout-gates", help="Also after gates (a sigmoid whose output only scales another tensor: squeeze-excitation, gated units).")] = False,
    dropout_constants: Annotated[bool, typer.Option("--dropout-constants", help="Also after activations whose value does not depend on the inputs (computed from parameters or buffers only: a learnt sigmoid(alpha), a position-bias MLP).")] = False,
    residual: Annotated[list[str] | None, typer.Option("--residual", metavar="GLOB", help="Wrap blocks whose qualified name matches (repeatable; * and ? stop at dots, ** crosses them).")] = None,
    residual_span: Annotated[list[str] | None, typer.Option("--residual-span", metavar="FIRST:LAST", help="Wrap a node span FIRST:LAST (or REGION/FIRST:LAST) of a traced region.")] = None,
    shortcut: Annotated[Shortcut, typer.Option("--shortcut", metavar=choices(Shortcut), help="Shortcut kind.")] = Shortcut.auto,
    shortcut_norm: Annotated[bool, typer.Option("--shortcut-norm", help="BatchNorm after a 1x1 conv shortcut.")] = False,
    post_act: Annotated[PostAct, typer.Option("--post-act", metavar=choices(PostAct), help="Activation after the sum.")] = PostAct.none,
    gate: Annotated[Gate, typer.Option("--gate", metavar=choices(Gate), help="zero: a learnable gate α on the shortcut, starting at 0 (H = F + α·S: the model computes what it did; it cannot revive a net that does not train). zero-branch: α on the block (H = α·F + S: each block starts as its shortcut, the form that trains a deep plain net).")] = Gate.none,
    bn_to_ln: Annotated[bool, typer.Option("--bn-to-ln", help="Replace BatchNorm with LayerNorm.")] = False,
    ln_over: Annotated[LnOver, typer.Option("--ln-over", metavar=choices(LnOver), help="c: over channels per position; chw: over C,H,W.")] = LnOver.c,
    init: Annotated[InitScheme | None, typer.Option("--init", metavar="SCHEME", help=f"Re-initialise weights with this scheme: {', '.join(e.value for e in InitScheme)}.")] = None,
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Seed for --init.")] = 0,
    keep_bias: Annotated[bool, typer.Option("--keep-bias", help="--init keeps biases instead of zeroing them.")] = False,
    fan: Annotated[Fan, typer.Option("--fan", metavar=choices(Fan), help="Fan mode for He initialisation.")] = Fan.fan_in,
    zero_init_residual: Annotated[bool, typer.Option("--zero-init-residual", help="Last norm of each residual block starts at 0.")] = False,
    include_frozen: Annotated[bool, typer.Option("--include-frozen", help="--init also re-initialises frozen parameters.")] = False,
    include: Annotated[list[str] | None, typer.Option("--include", metavar="GLOB", help="Only edit places whose qualified name matches (repeatable).")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", metavar="GLOB", help="Never edit places matching this glob (repeatable).")] = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", metavar="FILE", help="TOML recipe with [[passes]] to apply (before flag passes).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; write nothing.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Treat every warning as an error (exit 1, nothing written).")] = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="List every change, and show tracebacks of errors.")] = False,
) -> None:
    """Rewrite a model with passes and save it (weights, recipe, report, code).

    Example:

    \b
        graphtricks rewrite models/plain_cnn.py:PlainCNN --input-shape 8,3,32,32 --dropout 0.1 --out out/cnn
    """
    from graphtricks.io.precheck import check_output_dir, check_spec_path

    with user_errors(verbose):
        # what needs no torch first: a wrong path answers at once
        if out_dir is None and not dry_run:
            raise GraphtricksError("give --out DIR to write the rewritten model, or --dry-run to only see the plan")
        if device is Device.meta and not dry_run:
            raise GraphtricksError("a model on the meta device has no weights to write: add --dry-run to plan the rewrite")
        if out_dir is not None and not dry_run:
            check_output_dir(out_dir, force)
        check_spec_path(spec)
        if recipe is not None and not recipe.exists():
            raise RecipeError(f"recipe {recipe} does not exist")

        from graphtricks.io.folder import save
        from graphtricks.io.recipe import read_recipe
        from graphtricks.rewriting import rewrite as run_rewrite

        planned = read_recipe(recipe).build_passes() if recipe else []
        planned += _flag_passes(
            residual=residual or [], residual_span=residual_span or [], shortcut=shortcut.value,
            shortcut_norm=shortcut_norm, post_act=post_act.value, gate=gate.value, bn_to_ln=bn_to_ln,
            ln_over=ln_over.value, dropout=dropout, dropout_kind=dropout_kind.value,
            dropout_after=dropout_after or [], dropout_gates=dropout_gates, dropout_constants=dropout_constants,
            init=init.value if init else None, seed=seed, keep_bias=keep_bias, fan=fan.value,
            zero_init_residual=zero_init_residual, include_frozen=include_frozen,
            include=include or [], exclude=exclude or [],
        )
        with progress("loading and capturing the model…", as_json) as say:
            model, inputs, source, prior, keywords = load_source(spec, input_shape, input_dtype, model_arg, weights,
                                                                 trust_pickle, device, named_input, pretrained=pretrained)
            given = {"include": include or [], "exclude": exclude or [], "blocks": residual or []}
            with warnings.catch_warnings(record=True) as caught, _selection_flags(given):
                warnings.simplefilter("always")
                result = run_rewrite(model, planned, inputs, example_kwargs=keywords, inplace=True, progress=say)
        messages = _messages(result.report, caught, bool(planned))
        if strict and messages:
            warn(messages, False)
            raise GraphtricksError(f"{len(messages)} warning(s) and --strict: nothing written")
        written = None
        if not dry_run:
            with status(f"writing {out_dir}…", as_json):
                written = save(result, out_dir, source, force=force, prior_passes=prior)
        if as_json:
            payload = {"out": str(written) if written else None, "dry_run": dry_run, "warnings": messages,
                       "recipe": prior + result.recipe(), "report": result.report.to_dict()}
            print(json.dumps(payload, indent=2, default=str))
            return
        warn(messages, as_json)
        _print_result(result.report, out_dir, dry_run, verbose)
