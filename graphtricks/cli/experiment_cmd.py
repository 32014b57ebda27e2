"""``graphtricks experiment``: train the original model and each recipe's rewrite, and report what held."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from graphtricks.cli.common import (
    ForceOpt, JsonOpt, ModelArgOpt, VerboseOpt, choices, err, out, print_table, table, user_errors,
)
from graphtricks.errors import GraphtricksError

Schedule = Enum("Schedule", {k: k for k in ("constant", "step", "exponential", "cosine")}, type=str)
Optimizer = Enum("Optimizer", {k: k for k in ("adam", "sgd")}, type=str)
Precision = Enum("Precision", {k: k for k in ("float32", "bfloat16", "float16")}, type=str)
COLORS = {"held": "green", "not shown": "bright_black", "reversed": "red"}


def _sizes(text: str | None) -> tuple[int, ...]:
    """``"2,8,64"`` → (2, 8, 64), or a one-line error."""
    from graphtricks.experiment.errors import ExperimentError

    if not text:
        return ()
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ExperimentError(f"--batch-sizes takes integers separated by commas, e.g. 2,8,64; got {text!r}") from None
    if any(s < 1 for s in sizes):
        raise ExperimentError(f"--batch-sizes must be ≥ 1, got {text!r}")
    return sizes


def _verdict_table(panels) -> Table:
    made = table("claims", {"variant": "name", "claim": "text", "before → variant (±std)": "text", "verdict": "name"})
    for p in panels:
        color = COLORS[p["verdict"]]
        made.add_row(escape(p["variant"]), escape(p["claim"]),
                     f"{escape(p['before_name'])} {p['before_mean']:.3g} → {p['after_mean']:.3g} (±{p['spread']:.2g})",
                      f"[{color}]{p['verdict']}[/{color}]")
    return made


def experiment(
    spec: Annotated[str, typer.Argument(metavar="SPEC", help="The original model: file.py:Name, pkg.module:Name, or tv:/timm:/hf:NAME; its output must be (N, classes) logits.")],
    data: Annotated[str, typer.Option("--data", metavar="NAME|npz:FILE", help="digits, breast-cancer, wine, or npz:FILE (arrays x, y; optional x_val, y_val).")],
    recipe: Annotated[list[Path], typer.Option("--recipe", metavar="FILE", help="A variant: TOML [[passes]] of graph passes and loop techniques (repeatable).")],
    out_dir: Annotated[Path, typer.Option("--out", metavar="DIR", help="Folder for report.html, one PNG per figure and results.json (written atomically).")],
    seeds: Annotated[int, typer.Option("--seeds", metavar="N", min=1, help="Seeds 0..N-1; the same for every variant.")] = 3,
    epochs: Annotated[int, typer.Option("--epochs", metavar="N", min=1, help="Training epochs.")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N", min=1, help="Batch size.")] = 32,
    optimizer: Annotated[Optimizer, typer.Option("--optimizer", metavar=choices(Optimizer), help="Optimiser (shared by every variant).")] = Optimizer.adam,
    lr: Annotated[float, typer.Option("--lr", metavar="X", help="Learning rate.")] = 1e-3,
    momentum: Annotated[float, typer.Option("--momentum", metavar="X", help="SGD momentum.")] = 0.0,
    warmup: Annotated[int, typer.Option("--warmup", metavar="N", min=0, help="Linear LR warmup steps (all variants).")] = 0,
    schedule: Annotated[Schedule, typer.Option("--schedule", metavar=choices(Schedule), help="LR schedule after warmup.")] = Schedule.constant,
    step_size: Annotated[int, typer.Option("--step-size", metavar="N", min=1, help="step schedule: epochs between LR drops.")] = 1,
    gamma: Annotated[float, typer.Option("--gamma", metavar="X", help="step/exponential schedules: LR factor.")] = 0.5,
    clip_norm: Annotated[float | None, typer.Option("--clip-norm", metavar="X", help="Clip the global gradient norm to this.")] = None,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", metavar="X", help="Cross-entropy label smoothing ε.")] = 0.0,
    l1: Annotated[float, typer.Option("--l1", metavar="X", help="L1 penalty weight on the --penalty-layer layers.")] = 0.0,
    l2: Annotated[float, typer.Option("--l2", metavar="X", help="L2 penalty weight on the --penalty-layer layers.")] = 0.0,
    penalty_layer: Annotated[list[str] | None, typer.Option("--penalty-layer", metavar="GLOB", help="Glob of layers the L1/L2 penalty applies to (repeatable; default all).")] = None,
    precision: Annotated[Precision, typer.Option("--precision", metavar=choices(Precision), help="bfloat16 autocast on the CPU (float16 needs CUDA).")] = Precision.float32,
    loss_weight: Annotated[list[float] | None, typer.Option("--loss-weight", metavar="X", help="Weight of each output head's loss, in order (repeatable).")] = None,
    train_size: Annotated[int | None, typer.Option("--train-size", metavar="N", help="Keep only the first N training examples.")] = None,
    label_noise: Annotated[float, typer.Option("--label-noise", metavar="X", help="Fraction of training labels replaced by a wrong class.")] = 0.0,
    batch_sizes: Annotated[str | None, typer.Option("--batch-sizes", metavar="N,N,...", help="Batch sizes of the BN→LN accuracy-vs-batch-size panel, e.g. 2,8,64.")] = None,
    known_classes: Annotated[int | None, typer.Option("--known-classes", metavar="K", help="Train on classes 0..K-1 only; MC dropout's panels score the others as unseen.")] = None,
    baseline: Annotated[str | None, typer.Option("--baseline", metavar="NAME", help="Judge the other variants against this recipe's variant (its file name without .toml) instead of the original, which is then not trained.")] = None,
    model_arg: ModelArgOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Train the original model and each recipe's rewrite (same seeds, batches, optimiser) and judge each claim.

    Panels: loss/accuracy curves (every variant), signal propagation at init (init, residual),
    accuracy against batch size (bn_to_ln), calibration (label smoothing), unseen-class detection and
    calibration of MC dropout against the same network's deterministic prediction (mc_dropout). Verdict per panel:
    held / not shown / reversed, by the rule stated in the report. Needs the report extra:
    pip install -e ".[report]".

    Example:

    \b
        graphtricks experiment docs/evidence/models.py:WideMLP --data digits \\
            --recipe docs/evidence/recipes/dropout.toml --seeds 3 --epochs 20 --out out/dropout
    """
    from graphtricks.io.precheck import check_output_dir, check_spec_path

    with user_errors(verbose):
        # what needs no torch first: a wrong path answers at once
        check_spec_path(spec)
        check_output_dir(out_dir, force)
        for path in recipe:
            if not path.exists():
                raise GraphtricksError(f"recipe {path} does not exist")
        if data.startswith("npz:") and not Path(data[4:]).is_file():
            raise GraphtricksError(f"--data {data}: no such file")

        import torch

        _run(spec, data, recipe, out_dir, seeds, epochs, batch_size, optimizer, lr, momentum, warmup, schedule,
             step_size, gamma, clip_norm, label_smoothing, l1, l2, penalty_layer, precision, loss_weight,
             train_size, label_noise, batch_sizes, model_arg, force, as_json, torch, known_classes, baseline)


def _run(spec, data, recipe, out_dir, seeds, epochs, batch_size, optimizer, lr, momentum, warmup, schedule,
         step_size, gamma, clip_norm, label_smoothing, l1, l2, penalty_layer, precision, loss_weight,
         train_size, label_noise, batch_sizes, model_arg, force, as_json, torch, known_classes=None,
         baseline=None) -> None:
    """The command's body: settings → experiment → table or JSON."""
    from graphtricks.experiment import TrainConfig
    from graphtricks.experiment import experiment as run_experiment
    from graphtricks.io.specs import load_model, parse_model_args

    torch.set_num_threads(1)
    config = TrainConfig(
        epochs=epochs, batch_size=batch_size, optimizer=optimizer.value, lr=lr, momentum=momentum, warmup=warmup,
        schedule=schedule.value, step_size=step_size, gamma=gamma, clip_norm=clip_norm,
        label_smoothing=label_smoothing, l1=l1, l2=l2, penalty_layers=tuple(penalty_layer or ()),
        precision=precision.value, loss_weights=tuple(loss_weight or ()))
    kwargs = parse_model_args(model_arg)
    load_model(spec, kwargs)  # a bad spec fails here, once, before anything else

    def progress(line: str) -> None:
        err.print(line, style="dim", markup=False, highlight=False)

    result = run_experiment(lambda: load_model(spec, kwargs), data, recipe, seeds=seeds, config=config,
                            batch_sizes=_sizes(batch_sizes), train_size=train_size, label_noise=label_noise,
                            known_classes=known_classes, baseline=baseline, model_name=spec, out=out_dir,
                            force=force, progress=progress)
    if as_json:
        keys = ("variant", "kind", "claim", "metric", "before_name", "before", "after", "before_mean", "after_mean",
                "difference", "spread", "verdict", "figure")
        payload = {"out": str(out_dir), "report": str(out_dir / "report.html"), "results": str(out_dir / "results.json"),
                   "seconds": result.seconds, "panels": [{k: p[k] for k in keys} for p in result.panels]}
        print(json.dumps(payload, indent=2))
        return
    print_table(_verdict_table(result.panels))
    panels = f"{len(result.panels)} panel" + "s" * (len(result.panels) != 1)
    out.print(f"wrote {out_dir / 'report.html'} ({panels}, {result.seconds:.0f} CPU s)")
