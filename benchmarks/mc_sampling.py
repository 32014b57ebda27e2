"""MC-dropout sampling: ``gt.mc_sample`` in one tiled call ÷ the same T samples drawn in T separate runs.

Both sides run the same code (``gt.mc_sample``) on the same model and N examples: A tiles the
batch into T×N rows and runs once; B is ``max_rows=N``, i.e. T runs of the N examples, the way
MC dropout is usually written (a loop). The ratio A / B is the cost of tiling relative to the
loop (below 1: faster). Timing follows ``benchmarks/run.py``: interleaved reps after a warm-up,
medians of per-rep ratios, one thread, CPU time of the process (ONNX Runtime sessions are made
with one intra-op thread, so their work runs on the calling thread and is counted).

Cases: a PyTorch module rewritten with dropout (an MLP; torchvision ResNet-18 with BatchNorm),
and an ONNX Runtime session of the MLP's MC graph (``model.mc.onnx`` when the exporter writes one
with a symbolic batch, else the portable train graph of the BatchNorm-free MLP, which is the same
graph).

Usage::

    python benchmarks/mc_sampling.py                # full: T = 30; N = 32 and 1 (MLP), 4 at 64×64 (ResNet-18)
    python benchmarks/mc_sampling.py --quick --json
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (benchmarks/run.py: the shared timing helpers)

import graphtricks as gt  # noqa: E402

__all__ = ["GOAL", "PRESETS", "bench_mc_sampling", "main"]

# Tiling must never be slower than the loop; how much faster depends on how much of a run is
# per-call overhead (small batches, many small ops) rather than arithmetic, which tiling does not reduce.
GOAL = 1.0
DROPOUT_P = 0.1
# preset → (T, reps, warmup, inner, cases: name → (input shape, backend))
PRESETS: dict[str, tuple[int, int, int, int, dict[str, tuple[tuple[int, ...], str]]]] = {
    "full": (30, 7, 2, 5, {"mlp-torch": ((32, 64), "torch"), "mlp-torch-n1": ((1, 64), "torch"),
                           "resnet18-torch": ((4, 3, 64, 64), "torch"), "mlp-onnx": ((32, 64), "onnx"),
                           "mlp-onnx-n1": ((1, 64), "onnx")}),
    "quick": (30, 5, 1, 3, {"mlp-torch": ((32, 64), "torch"), "resnet18-torch": ((2, 3, 32, 32), "torch"),
                            "mlp-onnx": ((32, 64), "onnx")}),
    "tiny": (4, 2, 1, 1, {"mlp-torch": ((4, 64), "torch"), "mlp-onnx": ((4, 64), "onnx")}),
}


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def _model(name: str, shape: tuple[int, ...]) -> nn.Module:
    """The case's model, rewritten with dropout p = DROPOUT_P after every activation."""
    torch.manual_seed(0)
    if name.startswith("resnet18"):
        from graphtricks.io.specs import load_model

        base = load_model("tv:resnet18", {}).eval()
    else:
        base = _mlp()
    with bench._quiet():
        return gt.rewrite(base, [gt.InsertDropout(p=DROPOUT_P)], example_inputs=(torch.randn(*shape),)).model


def _mc_graph(model: nn.Module, shape: tuple[int, ...], folder: Path) -> str:
    """The path of the model's MC graph with a symbolic batch dimension."""
    from graphtricks.onnx import export_pair

    example = (torch.randn(*shape),)
    with bench._quiet():
        if "mc_dropout" in inspect.signature(export_pair).parameters:
            result = export_pair(model, example, folder, dynamic_batch=True, mc_dropout=True)
            if _symbolic_batch(result.mc_path):
                return str(result.mc_path)
        else:
            result = export_pair(model, example, folder, dynamic_batch=True)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise RuntimeError("no MC graph with a symbolic batch; only a BatchNorm-free model's train graph stands in")
    return str(result.train_path)


def _symbolic_batch(path: Path) -> bool:
    """Whether dimension 0 of every graph input is symbolic (a fixed one would make tiling T runs)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    return all(not v.type.tensor_type.shape.dim[0].HasField("dim_value")
               for v in graph.input if v.name not in inits and v.type.tensor_type.shape.dim)


def _side(target: Any, x: torch.Tensor, samples: int, max_rows: int | None) -> Callable[[], float]:
    """One timed ``mc_sample`` call (returns its seconds)."""
    return lambda: bench._timed(lambda: gt.mc_sample(target, x, samples, max_rows=max_rows))


def _case(name: str, shape: tuple[int, ...], backend: str, samples: int, reps: int, warmup: int, inner: int,
          folder: Path) -> dict[str, Any]:
    """One model: tiled ÷ T separate runs, and what ran."""
    model = _model(name, shape)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    target: Any = model
    if backend == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        path = _mc_graph(model, shape, folder / name)
        target = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        x = x.numpy()
    out = bench.interleave(_side(target, x, samples, None), _side(target, x, samples, shape[0]), reps, warmup, inner)
    out["detail"] = {"model": name, "backend": backend, "samples": samples, "batch": list(shape)}
    return out


def bench_mc_sampling(preset: str = "full") -> dict[str, Any]:
    """The figure: its worst case's ratio (tiled ÷ separate runs), each case's numbers under ``detail``."""
    samples, reps, warmup, inner, cases = PRESETS[preset]
    torch.set_num_threads(1)
    bench.set_clock("cpu")
    measured: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (shape, backend) in cases.items():
            bench._log(f"mc_sampling: {name}")
            try:
                measured[name] = _case(name, shape, backend, samples, reps, warmup, inner, Path(tmp))
            except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
                measured[name] = {"error": f"{type(e).__name__}: {e}"}
    ok = {k: v for k, v in measured.items() if "median" in v}
    if not ok:
        raise RuntimeError("mc_sampling: no case could be measured: " + json.dumps(measured))
    worst = max(ok, key=lambda k: ok[k]["median"])
    head = ok[worst]
    return {"median": head["median"], "min": head["min"], "max": head["max"], "goal": GOAL,
            "met": head["median"] <= GOAL, "headline": worst, "preset": preset,
            "what": f"gt.mc_sample, T = {samples} samples in one tiled run ÷ T separate runs", "detail": measured}


def main(argv: list[str] | None = None) -> int:
    """Command line: measure, print a table (or JSON), optionally write the JSON to a file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs, fewer reps")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="full (default), quick, or tiny (tests)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    parser.add_argument("--out", type=Path, help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    preset = args.preset or ("quick" if args.quick else "full")
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = {"machine": bench.machine_info(), "mc_sampling": bench_mc_sampling(preset)}
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.json:
        print(text, file=stdout)
        return 0
    print("| case | tiled ÷ separate (median) | min–max | tiled s | separate s |\n|---|---|---|---|---|", file=stdout)
    for name, case in result["mc_sampling"]["detail"].items():
        if "error" in case:
            print(f"| {name} | error | {case['error'][:70]} | – | – |", file=stdout)
        else:
            print(f"| {name} | {case['median']:.3f} | {case['min']:.3f}–{case['max']:.3f} | {case['a_s']:.4f} | "
                  f"{case['b_s']:.4f} |", file=stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
