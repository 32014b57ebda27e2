"""``graphtricks inspect``: what graphtricks sees in a model before it edits anything."""

from __future__ import annotations

import json
from collections import Counter
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
    PretrainedOpt,
    NamedInputOpt,
    TrustPickleOpt,
    WeightsOpt,
    load_source,
    out,
    print_table,
    status,
    table,
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


LONG_LIST = 20  # more candidate blocks than this are cut, with a count and a hint (--verbose lists all)
_SHORTCUT_MARK = {"graphtricks": "yes (wrapped)", "own": "yes (its own)", None: ""}


def _blocks_table(title: str, blocks: list[dict]) -> Table:
    """One row per candidate: shapes, the shortcut ``auto`` would pick, and a shortcut it already has."""
    made = table(title, {"block": "name", "type": "name", "input": "text", "output": "text",
                         "auto\nshortcut": "text", "has\nshortcut": "text"})
    for block in blocks:
        made.add_row(
            block["name"], block.get("type", ""), str(block.get("input_shape")), str(block.get("output_shape")),
            str(block.get("shortcut") or "none fits"), _SHORTCUT_MARK.get(block.get("has_shortcut"), ""),
        )
    return made


def _print_candidates(blocks: list[dict], layers: list[dict], every_row: bool) -> None:
    """Blocks in a table (cut after ``LONG_LIST`` rows), single layers as a count by type."""
    if blocks:
        shown = blocks if every_row else blocks[:LONG_LIST]
        print_table(_blocks_table("candidate blocks for --residual", shown))
        if len(shown) < len(blocks):
            out.print(f"[dim]{len(blocks) - len(shown)} more of {len(blocks)} blocks; --verbose lists every one,"
                      " --json gives them all[/dim]")
        own = sum(b.get("has_shortcut") is not None for b in blocks)
        if own:
            out.print(f"[dim]{own} block(s) already add their input back; --residual on them adds a second"
                      " shortcut[/dim]")
    else:
        out.print("candidate blocks for --residual: none (no child of a Sequential takes one tensor and returns one)")
    if layers and every_row:
        print_table(_blocks_table("single layers (--residual accepts them too)", layers))
    elif layers:
        kinds = Counter(b.get("type", "") for b in layers)
        listed = ", ".join(f"{k} ×{v}" for k, v in kinds.most_common())
        out.print(f"single layers (not listed as blocks): {len(layers)} — {listed}; --verbose lists them")


def inspect(
    spec: Annotated[str, typer.Argument(metavar="SPEC", help="Model spec or a saved DIR.")],
    input_shape: InputShapeOpt = None,
    named_input: NamedInputOpt = None,
    input_dtype: InputDtypeOpt = None,
    device: DeviceOpt = Device.cpu,
    model_arg: ModelArgOpt = None,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = False,
    trust_pickle: TrustPickleOpt = False,
    as_json: JsonOpt = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="List every candidate block and layer; show tracebacks of errors.")
    ] = False,
) -> None:
    """Show the region tree (traced / opaque and why), activations, norms and parameters.

    Example:

    \b
        graphtricks inspect models/control_flow.py:DataDependent --input-shape 2,3,16,16
    """
    from graphtricks.io.precheck import check_spec_path

    with user_errors(verbose):
        check_spec_path(spec)  # before torch: a wrong path answers at once

        from graphtricks.capturing.summary import summarize
        from graphtricks.passes import candidate_blocks
        from graphtricks.rewriting import rewrite as run_rewrite

        with status("capturing the model…", as_json):
            model, inputs, _, prior, keywords = load_source(spec, input_shape, input_dtype, model_arg, weights,
                                                            trust_pickle, device, named_input, pretrained=pretrained)
            result = run_rewrite(model, [], inputs, example_kwargs=keywords, inplace=True)
        summary = summarize(result.tree)
        found = candidate_blocks(result.tree, result.example_inputs, result.example_kwargs)
        summary["candidate_blocks"] = [b for b in found if not b["layer"]]
        summary["candidate_layers"] = [b for b in found if b["layer"]]
        if prior:
            summary["recipe"] = prior
        if as_json:
            print(json.dumps(summary, indent=2, default=str))
            return
        out.print(
            f"[bold]{summary['model']}[/bold]: {summary['parameters']:,} parameters "
            f"({summary['trainable_parameters']:,} trainable); traced {summary['traced_fraction']:.0%} "
            f"in {summary['regions']['traced']} traced / {summary['regions']['opaque']} opaque regions",
            soft_wrap=False,
        )
        tree = Tree("regions")
        _render_region(tree, summary["tree"])
        out.print(tree, soft_wrap=False)  # an opaque region's reason wraps in full
        for title in ("activations", "activation_forms", "norms"):
            items = ", ".join(f"{k} ×{v}" for k, v in summary[title].items()) or "none"
            out.print(f"{title.replace('_', ' ')}: {items}", soft_wrap=False)
        _print_candidates(summary["candidate_blocks"], summary["candidate_layers"], every_row=verbose)
