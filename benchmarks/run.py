"""graphtricks benchmarks: six overhead figures, each a ratio, measured side by side in one run.

Every figure compares graphtricks with a baseline on the same model and input. The two sides
run interleaved (A, B, then B, A, ...) after a warm-up, each rep gives one ratio A / B, and a
figure reports the median, min and max of those ratios. Where a figure has several cases
(models), its headline is the worst case: a goal is met only when every case meets it.

1. ``rewrite_overhead``: ``gt.rewrite`` (dropout, BN→LN, init, and residual on
   plain stages) ÷ the same unavoidable work by hand: ``copy.deepcopy``, one
   ``torch.fx.symbolic_trace``, one ``ShapeProp`` forward and init's ``nn.init`` draws
   (``without_copy_and_init``: rewrite without copy and init ÷ trace + forward, a diagnostic).
2. ``rewrite_scaling``: rewrite of a plain MLP with 8× the layers ÷ the smaller one.
3. ``train_step_overhead``: a training step of a rewritten model ÷ a hand-written twin.
4. ``infer_overhead``: eval inference of a model rewritten with dropout ÷ the original.
5. ``validate_vs_torch``: ``export_pair`` + ``validate_pair`` ÷ ``torch.onnx.export(dynamo=True,
   verify=True)`` of the eval graph alone; cases include a weight-heavy MLP (403 MB) and a
   BERT-base encoder.
6. ``peak_rss_ratio``: peak resident memory added by a rewrite ÷ the model's parameter bytes,
   each measurement in a fresh subprocess (copy, and ``inplace=True``).
7. ``export_vs_torch``: ``export_pair`` (train and inference graph, default torch.export path,
   train graph verified) ÷ ``torch.onnx.export(model.eval(), args, f, dynamo=True)`` of the
   inference graph alone; the TorchScript pair's time is reported beside them
   (``torchscript_pair_s``), as is where graphtricks' time goes with ``--breakdown``.

Usage::

    python benchmarks/run.py                 # full run, a markdown table
    python benchmarks/run.py --quick         # smaller models, fewer reps (< 3 min on 2 cores)
    python benchmarks/run.py --json --out benchmarks/results/cpu-$(date +%F).json
    python benchmarks/run.py --quick --only rewrite_scaling --breakdown   # + where the time goes (cProfile)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import datetime
import gc
import importlib
import importlib.metadata
import inspect
import io
import json
import os
import platform
import pstats
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

import graphtricks as gt
from graphtricks.io.specs import load_model
from graphtricks.layers.norm import ChannelLayerNorm
from graphtricks.passes import PASSES

__all__ = [
    "FIGURES",
    "GOALS",
    "MODELS",
    "PRESETS",
    "HandMLP",
    "HandVGG",
    "Preset",
    "bench_infer_overhead",
    "bench_peak_rss_ratio",
    "bench_rewrite_overhead",
    "bench_rewrite_scaling",
    "bench_train_step_overhead",
    "bench_export_vs_torch",
    "bench_validate_vs_torch",
    "breakdown",
    "interleave",
    "machine_info",
    "main",
    "markdown_table",
    "pass_list",
    "plain_mlp",
    "rss_child",
    "run_benchmarks",
    "set_clock",
]

ROOT = Path(__file__).resolve().parent.parent
FIGURES = (
    "rewrite_overhead",
    "rewrite_scaling",
    "train_step_overhead",
    "infer_overhead",
    "validate_vs_torch",
    "peak_rss_ratio",
    "export_vs_torch",
)
GOALS = {
    "rewrite_overhead": 1.3,
    "rewrite_scaling": 8.5,
    "train_step_overhead": 1.03,
    "infer_overhead": 1.01,
    "validate_vs_torch": 1.0,
    "peak_rss_ratio": 1.3,
    "export_vs_torch": 2.2,
}
INPLACE_RSS_GOAL = 0.3
DROPOUT_P = 0.1

_VIT = "torchvision.models.vision_transformer:VisionTransformer"
# name → (spec, constructor kwargs, input shape, residual block globs, note)
MODELS: dict[str, tuple[str, dict, tuple[int, ...], tuple[str, ...], str]] = {
    "resnet50": ("tv:resnet50", {}, (1, 3, 224, 224), (), "torchvision ResNet-50"),
    "resnet18": ("tv:resnet18", {}, (1, 3, 224, 224), (), "torchvision ResNet-18 (smaller stand-in for ResNet-50)"),
    "mobilenet_v3_large": ("tv:mobilenet_v3_large", {}, (1, 3, 224, 224), (), "torchvision MobileNetV3-Large"),
    "mobilenet_v3_small": (
        "tv:mobilenet_v3_small", {}, (1, 3, 224, 224), (), "torchvision MobileNetV3-Small (stand-in for -Large)",
    ),
    "vit_b_16": ("tv:vit_b_16", {}, (1, 3, 224, 224), (), "torchvision ViT-B/16"),
    "vit_ti_16": (
        _VIT, {"image_size": 224, "patch_size": 16, "num_layers": 12, "num_heads": 3, "hidden_dim": 192,
               "mlp_dim": 768}, (1, 3, 224, 224), (),
        "torchvision VisionTransformer at ViT-Ti/16 sizes (stand-in for ViT-B/16)",
    ),
    "plain_vgg": (
        f"{ROOT}/models/plain_vgg.py:PlainVGG", {}, (8, 3, 32, 32), ("stages.*",), "models/plain_vgg.py:PlainVGG",
    ),
    "plain_vgg_tiny": (
        f"{ROOT}/models/plain_vgg.py:PlainVGG", {"widths": (8, 16), "depth": 1}, (2, 3, 16, 16), ("stages.*",),
        "models/plain_vgg.py:PlainVGG(widths=(8, 16), depth=1)",
    ),
    "plain_cnn": (f"{ROOT}/models/plain_cnn.py:PlainCNN", {}, (8, 3, 32, 32), (), "models/plain_cnn.py:PlainCNN"),
    "mlp": (f"{ROOT}/models/mlp.py:MLP", {}, (32, 32), (), "models/mlp.py:MLP (Linear-BN-GELU x3)"),
    "weight_mlp": (
        f"{ROOT}/benchmarks/onnx_memory.py:WeightMLP", {}, (8, 4096), (),
        "6 x Linear(4096, 4096) + ReLU + head: 403 MB of float32 weights",
    ),
    "bert_base": ("hf:bert", {}, (1, 128), (), "Hugging Face BertModel at BERT-base size (110M parameters)"),
}
# Models fed token ids rather than floats: name -> vocabulary size.
_TOKEN_MODELS = {"bert_base": 30522}


@dataclass(frozen=True)
class Preset:
    """Sizes and repetition counts of one benchmark run.

    Attributes:
        name: ``full``, ``quick`` or ``tiny`` (tests only).
        reps: timed repetitions (ratios) per case; ``warmup`` untimed pairs before them.
        overhead_models: the models of ``rewrite_overhead``.
        scaling_depths: (small, large) layer counts of the plain MLP of ``rewrite_scaling``.
        scaling_reps: repetitions of ``rewrite_scaling`` (each large rewrite is slow).
        train_cases: (model, input shape, steps per call, alternating calls per rep) of
            ``train_step_overhead``.
        infer_cases: (model, forwards per call, alternating calls per rep) of ``infer_overhead``.
        onnx_models: the models of ``validate_vs_torch``.
        onnx_reps: repetitions of ``validate_vs_torch``.
        rss_width, rss_depth: the Linear-BN-ReLU MLP whose parameters ``peak_rss_ratio`` weighs.
        rss_reps: subprocess measurements per variant (copy, in place).
        export_models: the models of ``export_vs_torch`` (repetitions: ``onnx_reps``).
        rss_overlap: start the RSS subprocesses first and let them run beside the timed
            figures (peak RSS is per process, so its figure is unaffected, but the timings are
            disturbed: only for ``tiny``, whose timings nobody reads).
    """

    name: str
    reps: int
    warmup: int
    overhead_models: tuple[str, ...]
    scaling_depths: tuple[int, int]
    scaling_reps: int
    train_cases: tuple[tuple[str, tuple[int, ...], int, int], ...]
    infer_cases: tuple[tuple[str, int, int], ...]
    onnx_models: tuple[str, ...]
    onnx_reps: int
    rss_width: int
    rss_depth: int
    rss_reps: int
    rss_overlap: bool = False
    export_models: tuple[str, ...] = ("mobilenet_v3_small", "resnet18")


PRESETS = {
    "full": Preset(
        "full", reps=7, warmup=1,
        overhead_models=("resnet50", "mobilenet_v3_large", "vit_b_16", "plain_vgg"),
        scaling_depths=(512, 4096), scaling_reps=3,
        train_cases=(("plain_vgg", (32, 3, 32, 32), 1, 6), ("mlp", (32, 32), 1, 100)),
        # Twice the alternations of --quick: a 1 % goal sits inside a single rep's noise (±2 %).
        infer_cases=(("resnet50", 1, 12), ("plain_cnn", 1, 200)),
        onnx_models=("plain_vgg", "resnet18", "weight_mlp", "bert_base"), onnx_reps=3,
        rss_width=2048, rss_depth=16, rss_reps=3,
    ),
    "quick": Preset(
        "quick", reps=5, warmup=1,
        overhead_models=("resnet18", "mobilenet_v3_small", "vit_ti_16", "plain_vgg"),
        scaling_depths=(128, 1024), scaling_reps=3,
        train_cases=(("plain_vgg", (16, 3, 32, 32), 1, 6), ("mlp", (32, 32), 1, 100)),
        infer_cases=(("resnet18", 1, 6), ("plain_cnn", 1, 100)),
        onnx_models=("plain_vgg", "weight_mlp", "bert_base"), onnx_reps=3,
        rss_width=1024, rss_depth=16, rss_reps=2,
    ),
    "tiny": Preset(
        "tiny", reps=2, warmup=0,
        overhead_models=("plain_vgg_tiny",),
        scaling_depths=(2, 16), scaling_reps=2,
        train_cases=(("plain_vgg_tiny", (2, 3, 16, 16), 1, 1), ("mlp", (4, 32), 1, 2)),
        infer_cases=(("plain_cnn", 1, 2),),
        onnx_models=("plain_vgg_tiny",), onnx_reps=1,
        rss_width=256, rss_depth=4, rss_reps=1, rss_overlap=True, export_models=("plain_vgg_tiny",),
    ),
}


# -- measuring ------------------------------------------------------------------------------
def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ``cpu``: CPU seconds of this process (time.process_time). With one torch thread every op runs
# on the calling thread, so this counts all the work and none of the time other processes of a
# shared machine hold the core; on this 2-core machine it cut the min-max spread of a ratio
# about ten-fold (0.81-1.65 with wall time, 1.02-1.10 with CPU time, same runs).
# ``wall``: time.perf_counter. validate_vs_torch always uses wall time (ONNX Runtime's own
# thread pool spins, which CPU time would bill).
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}
_clock = CLOCKS["cpu"]


def set_clock(name: str) -> None:
    """Choose the clock of the timed figures: ``cpu`` (process CPU time) or ``wall``."""
    global _clock
    _clock = CLOCKS[name]


def _timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes (garbage collected first, so earlier garbage is not billed)."""
    gc.collect()
    start = _clock()
    fn()
    return _clock() - start


def _summary(ratios: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "n": len(ratios)}


def interleave(
    a: Callable[[], float], b: Callable[[], float], reps: int, warmup: int = 1, inner: int = 1
) -> dict[str, Any]:
    """Run ``a`` and ``b`` alternately and summarise the per-rep ratios ``a / b``.

    Each callable returns the seconds it measured itself (so its set-up is not timed). Within
    a rep, ``inner`` rounds alternate their order (A, B, B, A, ...) so a drifting machine load
    hits both sides alike; the rep's ratio is the median of A's calls over the median of B's
    (a median, so one call slowed by a neighbour process does not move it).

    Args:
        a: the measured side (graphtricks).
        b: the baseline.
        reps: timed reps (ratios).
        warmup: untimed (A, B) pairs run first.
        inner: alternating rounds per rep (more rounds: finer interleaving of short timings).

    Returns:
        ``{"median", "min", "max", "n", "a_s", "b_s"}``: ratio statistics, and median seconds
        of one call of each side.
    """
    for _ in range(warmup):
        a()
        b()
    ta: list[float] = []
    tb: list[float] = []
    flip = False
    for _ in range(reps):
        ra: list[float] = []
        rb: list[float] = []
        gc.collect()
        if inner > 1:  # short calls: no collection lands in one of them (as timeit does)
            gc.disable()
        try:
            for _ in range(inner):
                if flip:
                    rb.append(b())
                    ra.append(a())
                else:
                    ra.append(a())
                    rb.append(b())
                flip = not flip
        finally:
            gc.enable()
        ta.append(statistics.median(ra))
        tb.append(statistics.median(rb))
    out = _summary([x / y for x, y in zip(ta, tb)])
    out.update(a_s=statistics.median(ta), b_s=statistics.median(tb))
    return out


def _figure(name: str, what: str, cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A figure from its cases: the headline is the worst case (highest median ratio)."""
    measured = {k: v for k, v in cases.items() if "median" in v}
    if not measured:
        errors = "; ".join(f"{k}: {v.get('error')}" for k, v in cases.items())
        raise RuntimeError(f"{name}: no case could be measured ({errors})")
    worst = max(measured, key=lambda k: measured[k]["median"])
    head = measured[worst]
    return {
        "median": head["median"], "min": head["min"], "max": head["max"], "goal": GOALS[name],
        "met": head["median"] <= GOALS[name], "headline": worst, "what": what, "detail": cases,
    }


def _quiet() -> contextlib.ExitStack:
    """Silence warnings and stray prints of the library and exporters while timing."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def _build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """(model in eval mode, seeded inputs) for a name of ``MODELS``."""
    spec, kwargs, shape, _, _ = MODELS[name]
    torch.manual_seed(0)
    model = load_model(spec, dict(kwargs)).eval()
    gen = torch.Generator().manual_seed(1)
    if name in _TOKEN_MODELS:
        return model, (torch.randint(0, _TOKEN_MODELS[name], shape, generator=gen),)
    return model, (torch.randn(shape, generator=gen),)


def pass_list(residual_blocks: tuple[str, ...] = ()) -> tuple[list, list[str]]:
    """Fresh passes (dropout, BN→LN, residual where given, init) from the registry, and the skipped ones.

    ``init`` and ``residual`` are used only when registered in ``graphtricks.passes.PASSES``.
    """
    passes = [PASSES["dropout"](p=DROPOUT_P), PASSES["bn_to_ln"]()]
    skipped = []
    if residual_blocks:
        if "residual" in PASSES:
            passes.append(PASSES["residual"](list(residual_blocks)))
        else:
            skipped.append("residual")
    if "init" in PASSES:
        passes.append(PASSES["init"]())
    else:
        skipped.append("init")
    return passes, skipped


def _rewrite(model: nn.Module, inputs: tuple, residual_blocks: tuple[str, ...] = (), **kwargs: Any):
    passes, _ = pass_list(residual_blocks)
    with _quiet():
        return gt.rewrite(model, passes, inputs, **kwargs)


def _core_rewrite(model: nn.Module, inputs: tuple, blocks: tuple[str, ...]) -> float:
    """Seconds of a rewrite in place (of a copy made untimed) with every pass but init."""
    work = copy.deepcopy(model)
    passes = [p for p in pass_list(blocks)[0] if p.name != "init"]
    with _quiet():
        return _timed(lambda: gt.rewrite(work, passes, inputs, inplace=True))


def _floor(model: nn.Module, inputs: tuple) -> None:
    """The least a rewrite's capture must do: one fx trace and one shape-recording forward."""
    gm = fx.symbolic_trace(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)


def reinitialised(model: nn.Module, inputs: tuple, blocks: tuple[str, ...] = ()) -> list[str]:
    """The parameters a default rewrite gives new values (init's draws), by name."""
    after = dict(_rewrite(model, inputs, blocks).model.named_parameters())
    return [
        k for k, v in model.named_parameters()
        if k in after and after[k].shape == v.shape and not torch.equal(after[k], v)
    ]


def _honest_floor(model: nn.Module, inputs: tuple, drawn: list[str]) -> None:
    """What any rewrite of a caller's model must do by hand: copy it (the caller's model stays
    as it was), one fx trace, one shape-recording forward, and the same ``nn.init`` draws for
    the tensors ``init`` re-initialises (a fan-based draw per weight, zeros per bias)."""
    work = copy.deepcopy(model)
    params = dict(work.named_parameters())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in drawn:
            p = params[name]
            if p.dim() >= 2:
                nn.init.kaiming_normal_(p, nonlinearity="relu", generator=gen)
            else:
                nn.init.zeros_(p)
    _floor(work, inputs)


# -- where the time goes ------------------------------------------------------------------
_breakdown_on = False
# (label, path suffix, function names) of the stages a breakdown reports, by cumulative time.
_VALIDATE_STAGES = (
    ("export_pair", "graphtricks/onnx/export.py", ("export_pair",)),
    ("  torchscript export (2 modes)", "graphtricks/onnx/torchscript.py", ("export_mode",)),
    ("  write files (flushed on a thread, not profiled)", "graphtricks/onnx/weights.py", ("write_graphs",)),
    ("validate_pair", "graphtricks/onnx/validate.py", ("validate_pair",)),
    ("  onnxruntime run", "onnxruntime_inference_collection.py", ("run",)),
    ("  onnxruntime session init", "onnxruntime_inference_collection.py", ("_create_inference_session",)),
    ("  eager reference runs", "graphtricks/onnx/eager.py", ("run_reference",)),
    ("  float64 reference runs (where a fixed tolerance fails)", "graphtricks/onnx/checks/numeric.py", ("run",)),
    ("  weights check", "graphtricks/onnx/checks/graphs.py", ("check_weights",)),
    ("  side-effect digests", "graphtricks/onnx/eager.py", ("digest_model",)),
)


def _rewrite_stages(passes: list) -> tuple:
    rewrite_module = importlib.import_module("graphtricks.rewriting")  # the module, not gt.rewrite

    def where(function) -> str:  # the file that defines it, wherever it has moved
        path = Path(inspect.getsourcefile(function))
        return f"{path.parent.name}/{path.name}"

    stages = [
        ("deepcopy", "copy.py", ("deepcopy",)),
        ("capture", where(rewrite_module.capture), ("capture",)),
        ("propagate_shapes", where(rewrite_module.propagate_shapes), ("propagate_shapes",)),
        ("speed_up", where(rewrite_module.speed_up), ("speed_up",)),
    ]
    for p in passes:
        path = Path(sys.modules[type(p).__module__].__file__)
        stages.append((f"pass {p.name}", f"{path.parent.name}/{path.name}", ("call", "call_opaque")))
    return tuple(stages)


def breakdown(fn: Callable[[], Any], stages: tuple = (), top: int = 6) -> dict[str, Any]:
    """Where one call of ``fn`` spends its time, from cProfile (which slows Python code, not kernels).

    Returns:
        ``{"profiled_s", "stages": {label: share of the total}, "top_self": [...],
        "top_graphtricks": [...]}``: stage shares by cumulative time, the functions with the
        most time of their own, and the graphtricks functions with the most cumulative time.
    """
    fn()  # warm
    profiler = cProfile.Profile()
    gc.collect()
    profiler.enable()
    fn()
    profiler.disable()
    raw = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    total = max(v[3] for v in raw.values())

    def label(key) -> str:
        file, line, name = key
        return f"{'/'.join(Path(file).parts[-2:])}:{line}({name})" if file != "~" else name

    shares = {}
    for name, suffix, functions in stages:
        # Per function name the outermost entry (``capture`` the function calls ``capture`` the method).
        found = [
            max((v[3] for k, v in raw.items() if k[0].endswith(suffix) and k[2] == function), default=0.0)
            for function in functions
        ]
        shares[name] = round(sum(found) / total, 3)
    own = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    ours = sorted(
        ((k, v) for k, v in raw.items() if "/graphtricks/" in k[0] and not k[0].endswith("rewrite.py")),
        key=lambda kv: kv[1][3], reverse=True,
    )[:top]
    return {
        "profiled_s": round(total, 3),
        "stages": shares,
        "top_self": [{"function": label(k), "share": round(v[2] / total, 3), "calls": v[1]} for k, v in own],
        "top_graphtricks": [{"function": label(k), "share": round(v[3] / total, 3), "calls": v[1]} for k, v in ours],
    }


# -- 1. rewrite_overhead --------------------------------------------------------------------
def _rewrite_overhead_case(name: str, reps: int, warmup: int) -> dict[str, Any]:
    blocks = MODELS[name][3]
    passes, skipped = pass_list(blocks)
    model, inputs = _build(name)
    drawn = reinitialised(model, inputs, blocks)
    stats = interleave(
        lambda: _timed(lambda: _rewrite(model, inputs, blocks)),
        lambda: _timed(lambda: _honest_floor(model, inputs, drawn)),
        reps, warmup,
    )
    stats.update(
        model=MODELS[name][4], input_shape=list(inputs[0].shape), passes=[p.name for p in passes],
        skipped_passes=skipped, rewrite_s=stats.pop("a_s"), floor_s=stats.pop("b_s"),
        floor="copy.deepcopy + fx.symbolic_trace + one ShapeProp forward + init's draws",
        reinitialised=len(drawn),
    )
    # Diagnostic: the rewrite without the copy and init, against trace + forward alone (what
    # graphtricks itself adds: capture, shapes, the edits).
    core = interleave(
        lambda: _core_rewrite(model, inputs, blocks),
        lambda: _timed(lambda: _floor(model, inputs)),
        reps, warmup,
    )
    stats["without_copy_and_init"] = {k: core[k] for k in ("median", "min", "max", "n")}
    if _breakdown_on:
        stats["breakdown"] = breakdown(lambda: _rewrite(model, inputs, blocks), _rewrite_stages(passes))
    return stats


def _each_model(figure: str, models: tuple[str, ...], case, reps: int, warmup: int) -> dict[str, dict[str, Any]]:
    """``case(name, reps, warmup)`` per model; one model failing does not lose the others' figures."""
    out: dict[str, dict[str, Any]] = {}
    for name in models:
        _log(f"{figure}: {name}")
        try:
            out[name] = case(name, reps, warmup)
        except Exception as e:  # noqa: BLE001 - recorded in the figure, the run goes on
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


def bench_rewrite_overhead(models: tuple[str, ...], reps: int, warmup: int = 1) -> dict[str, Any]:
    """``gt.rewrite`` ÷ ``symbolic_trace`` + one ShapeProp forward, per model."""
    cases = _each_model("rewrite_overhead", models, _rewrite_overhead_case, reps, warmup)
    what = "gt.rewrite ÷ (copy.deepcopy + fx.symbolic_trace + one ShapeProp forward + init's nn.init draws)"
    return _figure("rewrite_overhead", what, cases)


# -- 2. rewrite_scaling ---------------------------------------------------------------------
def plain_mlp(depth: int, width: int = 8) -> nn.Sequential:
    """``depth`` × (Linear, BatchNorm1d, ReLU), flat: a graph of 3·depth nodes, no residuals."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
    return nn.Sequential(*layers).eval()


def bench_rewrite_scaling(depths: tuple[int, int], reps: int, warmup: int = 1, width: int = 8) -> dict[str, Any]:
    """Rewrite time of a plain MLP of ``depths[1]`` layers ÷ one of ``depths[0]`` layers."""
    small, large = depths
    _log(f"rewrite_scaling: {small} vs {large} layers")
    x = torch.randn(2, width)
    m_small, m_large = plain_mlp(small, width), plain_mlp(large, width)
    for _ in range(warmup):  # the small model warms the same code paths, in a fraction of the time
        _rewrite(m_small, (x,))
    stats = interleave(
        lambda: _timed(lambda: _rewrite(m_large, (x,))),
        lambda: _timed(lambda: _rewrite(m_small, (x,))),
        reps, warmup=0,
    )
    passes, skipped = pass_list()
    stats.update(
        layers=[small, large], linear=large / small, passes=[p.name for p in passes], skipped_passes=skipped,
        large_s=stats.pop("a_s"), small_s=stats.pop("b_s"),
    )
    if _breakdown_on:
        stats["breakdown"] = {
            str(depth): breakdown(lambda m=m: _rewrite(m, (x,)), _rewrite_stages(passes))
            for depth, m in ((small, m_small), (large, m_large))
        }
    what = f"rewrite time, plain MLP of {large} ÷ {small} Linear-BN-ReLU layers (linear = {large / small:g})"
    return _figure("rewrite_scaling", what, {f"mlp_{small}_vs_{large}": stats})


# -- 3. train_step_overhead -----------------------------------------------------------------
def _hand_layer(cin: int, cout: int, stride: int, p: float) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        ChannelLayerNorm(cout),
        nn.ReLU(inplace=True),
        nn.Dropout(p),
    ]


class HandVGG(nn.Module):
    """PlainVGG after dropout + BN→LN, written by hand: Conv, ChannelLayerNorm, ReLU, Dropout per layer."""

    def __init__(self, widths=(32, 64, 128), depth: int = 2, num_classes: int = 10, p: float = DROPOUT_P):
        super().__init__()
        self.stem = nn.Sequential(*_hand_layer(3, widths[0], 1, p))
        stages = []
        cin = widths[0]
        for i, width in enumerate(widths):
            layers = _hand_layer(cin, width, 1 if i == 0 else 2, p)
            for _ in range(depth - 1):
                layers += _hand_layer(width, width, 1, p)
            stages.append(nn.Sequential(*layers))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.stages(self.stem(x))).flatten(1))


class HandMLP(nn.Module):
    """models/mlp.py:MLP after dropout + BN→LN, written by hand: Linear, LayerNorm, GELU, Dropout."""

    def __init__(self, in_features=32, hidden=64, depth=3, out_features=10, p: float = DROPOUT_P):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(p)]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, out_features)

    def forward(self, x):
        return self.out(self.body(x))


def _hand_twin(name: str, model: nn.Module) -> nn.Module:
    """The hand-written twin of a rewritten example model, with the same weights."""
    spec, kwargs = MODELS[name][:2]
    cls = HandVGG if "plain_vgg" in spec else HandMLP if "mlp.py" in spec else None
    if cls is None:
        raise ValueError(f"no hand-written twin for {name}")
    twin = cls(**kwargs)
    theirs = list(model.parameters()) + list(model.buffers())
    ours = list(twin.parameters()) + list(twin.buffers())
    if [t.shape for t in theirs] != [t.shape for t in ours]:
        raise RuntimeError(f"hand-written twin of {name} does not have the rewritten model's layers")
    with torch.no_grad():
        for src, dst in zip(theirs, ours):
            dst.copy_(src)
    return twin


def _train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> Callable[[], float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def run() -> float:
        model.train()
        start = _clock()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()
        return _clock() - start

    return run


def bench_train_step_overhead(cases: tuple, reps: int, warmup: int = 1) -> dict[str, Any]:
    """A training step (forward, backward, SGD) of a rewritten model ÷ its hand-written twin."""
    out: dict[str, dict[str, Any]] = {}
    for name, shape, steps, inner in cases:
        _log(f"train_step_overhead: {name}")
        model, (x,) = _build(name)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        with _quiet():
            rewritten = gt.rewrite(model, [PASSES["dropout"](p=DROPOUT_P), PASSES["bn_to_ln"]()], (x,)).model
        twin = _hand_twin(name, rewritten)
        with torch.no_grad():  # the twin is faithful: same layers, same order, same weights
            same = torch.allclose(rewritten.eval()(x), twin.eval()(x), atol=1e-5, rtol=1e-4)
        if not same:
            raise RuntimeError(f"the hand-written twin of {name} computes something else than the rewritten model")
        with torch.no_grad():
            classes = rewritten(x).shape[1]
        y = torch.randint(0, classes, (shape[0],), generator=torch.Generator().manual_seed(3))
        stats = interleave(
            _train_steps(rewritten, x, y, steps), _train_steps(twin, x, y, steps), reps, warmup, inner
        )
        stats.update(
            model=MODELS[name][4], input_shape=list(shape), steps_per_call=steps, calls_per_rep=inner,
            passes=["dropout", "bn_to_ln"],
            rewritten_step_s=stats.pop("a_s") / steps, hand_step_s=stats.pop("b_s") / steps,
        )
        out[name] = stats
    return _figure("train_step_overhead", "train step (fwd+bwd+SGD) of a rewritten model ÷ hand-written twin", out)


# -- 4. infer_overhead ----------------------------------------------------------------------
def _forwards(model: nn.Module, inputs: tuple, iters: int) -> Callable[[], float]:
    def run() -> float:
        model.eval()
        with torch.no_grad():
            start = _clock()
            for _ in range(iters):
                model(*inputs)
            return _clock() - start

    return run


def bench_infer_overhead(cases: tuple, reps: int, warmup: int = 1) -> dict[str, Any]:
    """Eval-mode inference of a model rewritten with dropout ÷ the original model."""
    out: dict[str, dict[str, Any]] = {}
    for name, iters, inner in cases:
        _log(f"infer_overhead: {name}")
        model, inputs = _build(name)
        with _quiet():
            result = gt.rewrite(model, [PASSES["dropout"](p=DROPOUT_P)], inputs)
        rewritten = result.model.eval()
        stats = interleave(_forwards(rewritten, inputs, iters), _forwards(model, inputs, iters), reps, warmup, inner)
        stats.update(
            model=MODELS[name][4], input_shape=list(inputs[0].shape), forwards_per_call=iters, calls_per_rep=inner,
            dropouts=len(result.report.changes),
            rewritten_forward_s=stats.pop("a_s") / iters, original_forward_s=stats.pop("b_s") / iters,
        )
        out[name] = stats
    return _figure("infer_overhead", "eval forward of a model rewritten with dropout ÷ the original", out)


# -- 5. validate_vs_torch -------------------------------------------------------------------
def _validate_case(name: str, reps: int, warmup: int) -> dict[str, Any]:
    from graphtricks.onnx import (  # here: the RSS subprocesses need not import it
        export_pair,
        validate_pair,
    )

    model, inputs = _build(name)
    with _quiet():
        rewritten = gt.rewrite(model, [PASSES["dropout"](p=DROPOUT_P), PASSES["bn_to_ln"]()], inputs).model
    rewritten.eval()
    del model
    passed: list[bool] = []

    def export_validate() -> bool:
        with tempfile.TemporaryDirectory() as folder, _quiet():
            export_pair(rewritten, inputs, folder)
            return validate_pair(rewritten, inputs, folder, device="cpu").passed

    def ours() -> float:
        gc.collect()
        start = time.perf_counter()
        passed.append(export_validate())
        return time.perf_counter() - start

    def theirs() -> float:
        with tempfile.TemporaryDirectory() as folder, _quiet():
            rewritten.eval()
            gc.collect()
            start = time.perf_counter()
            torch.onnx.export(rewritten, inputs, os.path.join(folder, "model.onnx"), dynamo=True, verify=True)
            return time.perf_counter() - start

    stats = interleave(ours, theirs, reps, warmup)
    stats.update(
        model=MODELS[name][4], input_shape=list(inputs[0].shape), passes=["dropout", "bn_to_ln"],
        validation_passed=all(passed), graphtricks_s=stats.pop("a_s"), torch_s=stats.pop("b_s"),
    )
    if _breakdown_on:
        stats["breakdown"] = breakdown(export_validate, _VALIDATE_STAGES)
    return stats


def bench_validate_vs_torch(models: tuple[str, ...], reps: int, warmup: int = 1) -> dict[str, Any]:
    """``export_pair`` + ``validate_pair`` (two graphs, all checks) ÷ torch's dynamo export + verify.

    Wall time here, whatever the clock: ONNX Runtime runs on its own threads.
    """
    out = _each_model("validate_vs_torch", models, _validate_case, reps, warmup)
    what = ("graphtricks export_pair + validate_pair (device=cpu) ÷ "
            "torch.onnx.export(model.eval(), args, f, dynamo=True, verify=True), wall time")
    return _figure("validate_vs_torch", what, out)


# -- 7. export_vs_torch -------------------------------------------------------------------
_EXPORT_STAGES = (
    ("export_pair", "graphtricks/onnx/export.py", ("export_pair",)),
    ("  torch.export capture", "graphtricks/onnx/dynamo.py", ("_capture",)),
    ("  decompositions", "torch/onnx/_internal/exporter/_fx_passes.py", ("decompose_with_registry",)),
    ("  ONNX translation (decompositions included)", "graphtricks/onnx/dynamo.py", ("_translate",)),
    ("  onnxscript optimizer", "graphtricks/onnx/dynamo.py", ("_optimised_proto",)),
    ("  train graph verified against PyTorch", "graphtricks/onnx/export.py", ("_verify_written_train_graph",)),
)


def _export_case(name: str, reps: int, warmup: int) -> dict[str, Any]:
    from graphtricks.onnx import export_pair

    model, inputs = _build(name)
    with _quiet():
        rewritten = gt.rewrite(model, [PASSES["dropout"](p=DROPOUT_P), PASSES["bn_to_ln"]()], inputs).model
    rewritten.eval()
    del model
    used: list[str] = []

    def pair(exporter: str) -> Callable[[], float]:
        def run() -> float:
            with tempfile.TemporaryDirectory() as folder, _quiet():
                gc.collect()
                start = time.perf_counter()
                used.append(export_pair(rewritten, inputs, folder, exporter=exporter).exporter)
                return time.perf_counter() - start
        return run

    def theirs() -> float:
        with tempfile.TemporaryDirectory() as folder, _quiet():
            gc.collect()
            start = time.perf_counter()
            torch.onnx.export(rewritten, inputs, os.path.join(folder, "model.onnx"), dynamo=True)
            return time.perf_counter() - start

    stats = interleave(pair("dynamo"), theirs, reps, warmup)
    legacy = [pair("torchscript")() for _ in range(max(1, reps))]
    stats.update(
        model=MODELS[name][4], input_shape=list(inputs[0].shape), passes=["dropout", "bn_to_ln"],
        exporter=used[0], graphtricks_s=stats.pop("a_s"), torch_s=stats.pop("b_s"),
        torchscript_pair_s=statistics.median(legacy),
    )
    if _breakdown_on:
        stats["breakdown"] = breakdown(pair("dynamo"), _EXPORT_STAGES)
    return stats


def bench_export_vs_torch(models: tuple[str, ...], reps: int, warmup: int = 1) -> dict[str, Any]:
    """``export_pair`` (both graphs, torch.export path) ÷ torch's dynamo export of the eval graph.

    Wall time: the exporters' work is all on this thread, but the verification's ONNX Runtime
    session has its own.
    """
    out = _each_model("export_vs_torch", models, _export_case, reps, warmup)
    what = ("graphtricks export_pair (train + inference graph, torch.export) ÷ "
            "torch.onnx.export(model.eval(), args, f, dynamo=True), wall time; torchscript_pair_s beside")
    return _figure("export_vs_torch", what, out)


# -- 6. peak_rss_ratio ----------------------------------------------------------------------
def _status_kib(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_child(width: int, depth: int, inplace: bool) -> dict[str, Any]:
    """In a fresh process: the peak RSS a rewrite adds, over the model's parameter bytes."""
    import resource

    model = plain_mlp(depth, width)
    x = torch.randn(1, width)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    _rewrite(plain_mlp(2, 8), (torch.randn(2, 8),))  # lazy imports and code paths, off the books
    with torch.no_grad():
        model(x)  # kernels and allocator warm
    gc.collect()
    if _reset_peak() and _status_kib("VmHWM") is not None:
        method = "VmHWM after − VmRSS before (peak reset via /proc/self/clear_refs)"
        before = _status_kib("VmRSS") * 1024
        result = _rewrite(model, (x,), inplace=inplace)
        peak = _status_kib("VmHWM") * 1024
        after = _status_kib("VmRSS") * 1024
    else:  # no resettable peak: compare peaks (an earlier, higher peak would hide part of it)
        method = "ru_maxrss after − ru_maxrss before"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result = _rewrite(model, (x,), inplace=inplace)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        after = None  # no current RSS to read
    del result
    return {"param_bytes": size, "peak_added_bytes": peak - before,
            "retained_bytes": None if after is None else after - before,
            "ratio": (peak - before) / size, "method": method}


def _start_rss_child(width: int, depth: int, inplace: bool, threads: int) -> subprocess.Popen:
    args = json.dumps({"width": width, "depth": depth, "inplace": inplace})
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads), "--rss-child", args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _finish_rss_child(proc: subprocess.Popen) -> dict[str, Any]:
    stdout, stderr = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"rss child failed ({proc.returncode}): {stderr.strip()[-2000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def bench_peak_rss_ratio(
    width: int, depth: int, reps: int, threads: int = 1, started: list | None = None
) -> dict[str, Any]:
    """Peak RSS added by a rewrite ÷ parameter bytes, copy and ``inplace=True``, one process each.

    The copy and in-place processes of a rep run side by side: peak RSS is per process, so
    they do not disturb each other's figure (only their wall time).

    Args:
        width, depth: the Linear-BN-ReLU MLP rewritten in each process.
        reps: processes per variant.
        threads: torch threads in each process.
        started: ``[(inplace, process), ...]`` already started (see ``Preset.rss_overlap``);
            when given, only these are awaited.
    """
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    if started is not None:
        for inplace, proc in started:
            runs[inplace].append(_finish_rss_child(proc))
    for i in range(reps if started is None else 0):
        _log(f"peak_rss_ratio: copy and in place, {i + 1}/{reps}")
        procs = {inplace: _start_rss_child(width, depth, inplace, threads) for inplace in (False, True)}
        for inplace, proc in procs.items():
            runs[inplace].append(_finish_rss_child(proc))
    cases = {}
    for inplace, goal in ((False, GOALS["peak_rss_ratio"]), (True, INPLACE_RSS_GOAL)):
        got = runs[inplace]
        stats = _summary([r["ratio"] for r in got])
        stats.update(
            goal=goal, met=stats["median"] <= goal, param_bytes=got[0]["param_bytes"],
            peak_added_bytes=statistics.median(r["peak_added_bytes"] for r in got),
            retained_bytes=None if got[0]["retained_bytes"] is None
            else statistics.median(r["retained_bytes"] for r in got),
            method=got[0]["method"],
            model=f"{depth} x (Linear({width},{width}), BatchNorm1d, ReLU)", passes=[p.name for p in pass_list()[0]],
        )
        cases["inplace" if inplace else "copy"] = stats
    copy = cases["copy"]
    return {
        "median": copy["median"], "min": copy["min"], "max": copy["max"], "goal": GOALS["peak_rss_ratio"],
        "met": copy["met"] and cases["inplace"]["met"], "headline": "copy",
        "what": "peak RSS added by rewrite ÷ parameter bytes (headline: copy, goal 1.3; in place, goal 0.3)",
        "detail": cases,
    }


# -- the run --------------------------------------------------------------------------------
def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=False)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=False)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def machine_info() -> dict[str, Any]:
    """The machine and software the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1).strip() if found else cpu
    versions = {}
    for name in ("torchvision", "timm", "onnx", "onnxruntime", "onnxscript"):
        with contextlib.suppress(Exception):
            versions[name] = importlib.metadata.version(name)
    return {
        "cpu_count": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "platform": platform.platform(), "graphtricks": gt.__version__,
        "git": _git_commit(), "passes_registered": sorted(PASSES), **versions,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def run_benchmarks(
    preset: Preset, only: tuple[str, ...] = FIGURES, threads: int = 1, clock: str = "cpu", breakdown: bool = False
) -> dict[str, Any]:
    """Measure the figures named in ``only`` with ``preset``'s sizes; a JSON-able dict.

    A figure that fails is reported as ``{"error": ...}`` instead of losing the run.
    """
    global _breakdown_on
    torch.set_num_threads(threads)
    set_clock(clock)
    _breakdown_on = breakdown
    started = time.perf_counter()
    out: dict[str, Any] = {
        "machine": machine_info(),
        "clock": clock,
        "breakdown": breakdown,
        "preset": asdict(preset),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    jobs: dict[str, Callable[[], dict[str, Any]]] = {
        "rewrite_overhead": lambda: bench_rewrite_overhead(preset.overhead_models, preset.reps, preset.warmup),
        "rewrite_scaling": lambda: bench_rewrite_scaling(preset.scaling_depths, preset.scaling_reps, preset.warmup),
        "train_step_overhead": lambda: bench_train_step_overhead(preset.train_cases, preset.reps, preset.warmup),
        "infer_overhead": lambda: bench_infer_overhead(preset.infer_cases, preset.reps, preset.warmup),
        "validate_vs_torch": lambda: bench_validate_vs_torch(preset.onnx_models, preset.onnx_reps, preset.warmup),
        "export_vs_torch": lambda: bench_export_vs_torch(preset.export_models, preset.onnx_reps, preset.warmup),
        "peak_rss_ratio": lambda: bench_peak_rss_ratio(
            preset.rss_width, preset.rss_depth, preset.rss_reps, threads, early
        ),
    }
    early = None
    if preset.rss_overlap and "peak_rss_ratio" in only:
        early = [
            (inplace, _start_rss_child(preset.rss_width, preset.rss_depth, inplace, threads))
            for _ in range(preset.rss_reps)
            for inplace in (False, True)
        ]
    for name in FIGURES:
        if name not in only:
            continue
        t0 = time.perf_counter()
        try:
            out[name] = jobs[name]()
        except Exception as e:  # noqa: BLE001 - a failing figure must not lose the others
            out[name] = {"error": f"{type(e).__name__}: {e}", "goal": GOALS[name]}
        out[name]["seconds"] = round(time.perf_counter() - t0, 1)
    out["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def markdown_table(results: dict[str, Any]) -> str:
    """The figures as a markdown table: figure, median, min–max, goal, met?"""
    lines = ["| figure | median | min–max | goal | met? |", "|---|---|---|---|---|"]
    for name in FIGURES:
        fig = results.get(name)
        if fig is None:
            continue
        if "error" in fig:
            lines.append(f"| `{name}` | error | {fig['error'][:60]} | ≤ {fig['goal']:g} | – |")
            continue
        rows = [(name, fig["headline"], fig)]
        if name == "peak_rss_ratio":
            rows = [(name, "copy", fig["detail"]["copy"]), (name, "inplace", fig["detail"]["inplace"])]
        for label, case, f in rows:
            goal = f.get("goal", fig["goal"])
            met = "yes" if f["median"] <= goal else "**no**"
            lines.append(
                f"| `{label}` ({case}) | {f['median']:.3f} | {f['min']:.3f}–{f['max']:.3f} | ≤ {goal:g} | {met} |"
            )
        if name == "export_vs_torch":  # each exporter's time side by side
            for case, f in fig["detail"].items():
                if "torchscript_pair_s" in f:
                    lines.append(
                        f"| ↳ seconds ({case}): pair on torch.export {f['graphtricks_s']:.2f}, pair on "
                        f"TorchScript {f['torchscript_pair_s']:.2f}, torch's eval export {f['torch_s']:.2f} | – | – | – | – |"
                    )
        cores = {k: v["without_copy_and_init"] for k, v in fig["detail"].items() if "without_copy_and_init" in v}
        if cores:  # rewrite_overhead's diagnostic: no goal of its own
            case = max(cores, key=lambda k: cores[k]["median"])
            f = cores[case]
            lines.append(f"| ↳ without copy and init ({case}) | {f['median']:.3f} | {f['min']:.3f}–{f['max']:.3f} | – | – |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: run the benchmarks, print a table (or JSON), optionally write JSON to a file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller models and fewer reps (< 3 min on 2 cores)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="full (default), quick, or tiny (tests)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    parser.add_argument("--out", type=Path, help="also write the JSON result to this file")
    parser.add_argument("--only", action="append", choices=FIGURES, help="measure only this figure (repeatable)")
    parser.add_argument("--reps", type=int, help="override the preset's repetitions")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads for every measurement (default 1: on a loaded 2-core machine, a second OpenMP thread "
             "costs milliseconds to wake per small op)",
    )
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="cpu",
        help="cpu: process CPU time (default; robust to other load on a shared machine), wall: wall time",
    )
    parser.add_argument(
        "--breakdown", action="store_true",
        help="after timing, profile one graphtricks run per case (cProfile) and add where its time goes to the JSON",
    )
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.rss_child:
        print(json.dumps(rss_child(**json.loads(args.rss_child))))
        return 0
    preset = PRESETS[args.preset or ("quick" if args.quick else "full")]
    if args.reps:
        preset = replace(preset, reps=args.reps, scaling_reps=args.reps, onnx_reps=args.reps, rss_reps=args.reps)
    only = tuple(args.only or FIGURES)
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # exporters print progress; stdout is for the result
        results = run_benchmarks(preset, only, args.threads, args.clock, args.breakdown)
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.json:
        print(text, file=stdout)
    else:
        m = results["machine"]
        print(f"preset {preset.name}: {m['cpu_count']} CPUs ({m['cpu']}), torch {m['torch']}, "
              f"{m['torch_threads']} thread(s), {results['clock']} clock, "
              f"load {m['loadavg_start']} → {m['loadavg_end']}, {results['seconds']} s\n", file=stdout)
        print(markdown_table(results), file=stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
