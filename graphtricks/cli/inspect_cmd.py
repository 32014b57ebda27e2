"""``graphtricks inspect``: what graphtricks sees in a model before it edits anything."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table
from rich.tree import Tree

from graphtricks.cli.common import (
    Device,
    DeviceOpt,
    InputDtypeOpt,
    InputShapeOpt,
    JsonOpt,
    ModelArgOpt,
    TrustPickleOpt,
    VerboseOpt,
    WeightsOpt,
    load_source,
    out,
    status,
    user_errors,
)


def _render_region(tree: Tree, region: dict) -> None:
    """Add a region and its children to a rich tree, marking traced and opaque ones."""
    label = region["path"] or "<root>"
    kind = "[green]traced[/green]" if region["kind"] == "traced" else "[yellow]opaque[/yellow]"
    extra = f" ({region['nodes']} nodes)" if "nodes" in region else ""
    reason = f" — {region['reason']}" if region.get("reason") else ""
    branch = tree.add(f"{label} [dim]{region['type']}[/dim] {kind}{extra}{reason}")
    for child in region["children"]:
        _render_region(branch, child)


def inspect(
    spec: Annotated[str, typer.Argument(metavar="SPEC", help="Model spec or a saved DIR.")],
    input_shape: InputShapeOpt = None,
    input_dtype: InputDtypeOpt = None,
    device: DeviceOpt = Device.cpu,
    model_arg: ModelArgOpt = None,
    weights: WeightsOpt = None,
    trust_pickle: TrustPickleOpt = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Show the region tree (traced / opaque and why), activations, norms and parameters.

    Example:

    \b
        graphtricks inspect models/control_flow.py:DataDependent --input-shape 2,3,16,16
    """
    from graphtricks.capture.summary import summarize
    from graphtricks.passes import candidate_blocks
    from graphtricks.rewrite import rewrite as run_rewrite

    with user_errors(verbose):
        with status("capturing the model…", as_json):
            model, inputs, _, prior = load_source(spec, input_shape, input_dtype, model_arg, weights, trust_pickle, device)
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
