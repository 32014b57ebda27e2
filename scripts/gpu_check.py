"""GPU evidence in one command: export and validate real models on CUDA, write what happened.

Run on a machine with a CUDA GPU, PyTorch with CUDA and onnxruntime-gpu (never together with
onnxruntime)::

    python scripts/gpu_check.py                 # writes benchmarks/results/gpu-YYYY-MM-DD/
    python scripts/gpu_check.py --dry-run       # same flow on CPU (checks the script, not the GPU)

Each model (the examples of models/, torchvision ResNet-18, timm ConvNeXt-atto, a BERT-style
encoder from a Hugging Face config: no weights are downloaded) is rewritten with all four
techniques (dropout, residual shortcuts where a block fits, BatchNorm -> LayerNorm, init),
exported with the default exporter (torch.export twins; ``--exporter torchscript`` for the
legacy one; a model torch.export cannot capture falls back and says so), with the MC-dropout
graph, and validated with ``--device cuda``. Every graph's ops are checked against ONNX Runtime's
CUDA kernel list (``cuda_gaps``): a gap fails the model. Per model the JSON report, the export
result (which exporter wrote each graph) and timings go to ``<out>/<name>.json``;
``summary.json`` and ``nvidia-smi.txt`` sit beside them. Exit code 1 when any model fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

EXAMPLES = {
    "models/plain_cnn.py:PlainCNN": (4, 3, 32, 32),
    "models/mlp.py:MLP": (8, 32),
    "models/encoder_block.py:TinyEncoder": (2, 6, 32),
    "models/functional_acts.py:FunctionalActs": (2, 3, 16, 16),
    "models/control_flow.py:DataDependent": (2, 3, 16, 16),
    "models/plain_vgg.py:PlainVGG": (2, 3, 32, 32),
}


def _real_models() -> dict[str, tuple]:
    """(builder, example inputs) of the three real architectures, built from configs."""

    def resnet():
        import torchvision

        return torchvision.models.resnet18(weights=None), (torch.randn(4, 3, 64, 64),)

    def convnext():
        import timm

        return timm.create_model("convnext_atto", pretrained=False), (torch.randn(4, 3, 64, 64),)

    def bert():
        from transformers import BertConfig, BertModel

        config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, vocab_size=1000)
        return BertModel(config), (torch.randint(0, 1000, (2, 16)),)

    return {"tv:resnet18": resnet, "timm:convnext_atto": convnext, "hf:bert-tiny": bert}


def _passes(inputs: tuple):
    """All four techniques; a pass that finds nothing to do only warns."""
    import graphtricks as gt

    return [gt.InsertDropout(p=0.1), gt.AddResidual(), gt.BatchNormToLayerNorm(), gt.Initialize()]


def _check(name: str, model, inputs: tuple, device: str, out: Path, exporter: str = "dynamo") -> dict:
    """Rewrites, exports and validates one model; returns its record."""
    import onnx

    import graphtricks as gt
    from graphtricks.onnx import export_pair, digest_model, validate_pair
    from graphtricks.onnx.cuda_kernels import cuda_gaps

    record: dict = {"model": name, "device": device}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                result = gt.rewrite(model.eval(), _passes(inputs), example_inputs=inputs)
            except Exception as e:  # a technique this model cannot take: the others still run
                record["rewrite_error"] = f"{type(e).__name__}: {e}"
                result = gt.rewrite(model.eval(), [gt.InsertDropout(p=0.1)], example_inputs=inputs)
        record["rewrite_s"] = round(time.perf_counter() - start, 3)
        rewritten = result.model
        before = digest_model(rewritten)
        with tempfile.TemporaryDirectory() as folder:
            t = time.perf_counter()
            with warnings.catch_warnings(record=True) as leaked:  # none may reach the user
                warnings.simplefilter("always")
                exported = export_pair(rewritten, inputs, folder, exporter=exporter, mc_dropout=True)
            record["export"] = exported.to_dict()
            record["export_s"] = round(time.perf_counter() - t, 3)
            record["leaked_warnings"] = [
                f"{w.category.__name__}: {w.message}" for w in leaked
                if issubclass(w.category, (DeprecationWarning, torch.jit.TracerWarning))
            ]
            graphs = [exported.train_path, exported.infer_path, exported.mc_path]
            record["cuda_gaps"] = {p.name: cuda_gaps(onnx.load(str(p), load_external_data=False))
                                   for p in graphs if p is not None}
            t = time.perf_counter()
            report = validate_pair(rewritten, inputs, folder, device=device, baseline=before)
            record["validate_s"] = round(time.perf_counter() - t, 3)
        record["report"] = report.to_dict()
        record["passed"] = (report.passed and not any(record["cuda_gaps"].values())
                            and not (exporter == "dynamo" and record["leaked_warnings"]))
    except Exception as e:
        record["passed"] = False
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc()
    record["total_s"] = round(time.perf_counter() - start, 3)
    (out / f"{name.replace('/', '_').replace(':', '_')}.json").write_text(
        json.dumps(record, indent=2, default=str)
    )
    return record


def _nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi unavailable: {e}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument("--dry-run", action="store_true", help="validate on CPU instead of CUDA")
    parser.add_argument("--only", nargs="*", default=None, help="model names to run")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                        help="the ONNX exporter (default: torch.export twins)")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from graphtricks.io.inputs import make_example_inputs
    from graphtricks.io.specs import load_model
    from graphtricks.onnx import cuda_available

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not cuda_available():
        print("no CUDA: needs torch with CUDA and onnxruntime-gpu (use --dry-run on CPU)",
              file=sys.stderr)
        return 2
    date = datetime.date.today().isoformat()
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu-{date}{'-dry' if args.dry_run else ''}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "nvidia-smi.txt").write_text(_nvidia_smi())

    jobs = {}
    for spec, shape in EXAMPLES.items():
        if (ROOT / spec.split(":")[0]).is_file():
            jobs[spec] = (lambda s=spec, sh=shape: (
                load_model(str(ROOT / s.split(":")[0]) + ":" + s.split(":")[1]),
                make_example_inputs([sh], seed=1),
            ))
    jobs.update(_real_models())
    records = []
    for name, build in jobs.items():
        if args.only and name not in args.only:
            continue
        torch.manual_seed(0)
        try:
            model, inputs = build()
        except Exception as e:  # a missing optional package: recorded, not fatal
            records.append({"model": name, "passed": False, "error": f"cannot build: {e}"})
            continue
        record = _check(name, model, tuple(inputs), device, out, args.exporter)
        records.append(record)
        print(f"{name}: {'passed' if record['passed'] else 'FAILED'} ({record['total_s']}s)"
              + (f" {record.get('error', '')}" if not record["passed"] else ""))
    summary = {
        "date": date, "device": device, "dry_run": args.dry_run,
        "torch": torch.__version__, "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(), "python": platform.python_version(),
        "exporter": args.exporter,
        "models": {r["model"]: {"passed": r.get("passed"), "error": r.get("error"),
                                "total_s": r.get("total_s"),
                                "exporter": (r.get("export") or {}).get("exporter"),
                                "cuda_gaps": r.get("cuda_gaps")}
                   for r in records},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return 0 if all(r["passed"] for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
