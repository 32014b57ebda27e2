"""Export and validate the example models on a CUDA machine; write JSON reports and nvidia-smi.

Usage (from the repository root, with onnxruntime-gpu installed and not onnxruntime)::

    python scripts/gpu_check.py RESULTS_DIR [--device cuda] [--dropout 0.1]

For each example model in ``models/`` (a missing file is skipped), it exports the train and
inference graphs and validates them with ``device`` (default ``cuda``: an error when ONNX
Runtime's CUDA provider is missing or falls back). ``--dropout P`` first inserts dropout after
activations with graphtricks' pass; by default the models are used as they are. Writes
``RESULTS_DIR/<model>.json``, ``summary.json``, ``environment.json`` and ``nvidia-smi.txt``.
Exit code: 0 when every model passed, 1 otherwise, 2 when the device cannot be used at all.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from graphtricks.errors import GraphtricksError  # noqa: E402
from graphtricks.onnx import export_pair, snapshot_model, validate_pair  # noqa: E402

# (file, class, example input shape)
MODELS = [
    ("models/plain_cnn.py", "PlainCNN", (8, 3, 32, 32)),
    ("models/mlp.py", "MLP", (8, 32)),
    ("models/encoder_block.py", "EncoderBlock", (4, 16, 32)),
    ("models/encoder_block.py", "TinyEncoder", (4, 16, 32)),
    ("models/plain_vgg.py", "PlainVGG", (4, 3, 32, 32)),
    ("models/control_flow.py", "DataDependent", (4, 3, 16, 16)),
]


def load_class(path: Path, name: str):
    """Imports ``name`` from a Python file by path."""
    spec = importlib.util.spec_from_file_location(f"gpu_check_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def environment() -> dict:
    info = {
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(),
        "torch_cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["torch_cuda_version"] = torch.version.cuda
    return info


def nvidia_smi() -> str:
    try:
        done = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60)
        return done.stdout + done.stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi unavailable: {e}"


def check_model(path: Path, name: str, shape, args, out: Path) -> dict:
    """Builds, (optionally) rewrites, exports and validates one model; returns its record."""
    torch.manual_seed(0)
    model = load_class(path, name)()
    inputs = (torch.randn(*shape),)
    record: dict = {"model": f"{path.relative_to(ROOT)}:{name}", "input_shape": list(shape)}
    if args.dropout is not None:
        from graphtricks.passes.dropout import insert_dropout

        model = insert_dropout(model, inputs, p=args.dropout).model
        record["dropout"] = args.dropout
    before = snapshot_model(model)
    start = time.perf_counter()
    exported = export_pair(model, inputs, out / "onnx" / name, dynamic_batch=True)
    record["export"] = exported.to_dict()
    report = validate_pair(model, inputs, out / "onnx" / name, device=args.device, baseline=before)
    record["validation"] = report.to_dict()
    record["seconds"] = round(time.perf_counter() - start, 3)
    record["passed"] = report.passed
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="folder for the JSON reports")
    parser.add_argument("--device", default="cuda", choices=["cuda", "auto", "cpu"])
    parser.add_argument("--dropout", type=float, default=None, help="insert dropout with this p")
    args = parser.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "nvidia-smi.txt").write_text(nvidia_smi())
    env = environment()
    (args.results / "environment.json").write_text(json.dumps(env, indent=2))
    if args.device == "cuda" and "CUDAExecutionProvider" not in env["ort_providers"]:
        print(f"no CUDAExecutionProvider in onnxruntime {ort.__version__}: install onnxruntime-gpu")
        return 2

    summary = []
    for file, name, shape in MODELS:
        path = ROOT / file
        if not path.is_file():
            summary.append({"model": f"{file}:{name}", "skipped": "file missing"})
            continue
        try:
            record = check_model(path, name, shape, args, args.results)
        except GraphtricksError as e:
            record = {"model": f"{file}:{name}", "passed": False, "error": str(e)}
        except Exception as e:  # keep going: one broken model must not hide the others
            record = {"model": f"{file}:{name}", "passed": False, "error": repr(e),
                      "traceback": traceback.format_exc()}
        (args.results / f"{name}.json").write_text(json.dumps(record, indent=2))
        validation = record.get("validation", {})
        summary.append({
            "model": record["model"], "passed": record["passed"],
            "seconds": record.get("seconds"), "providers": validation.get("providers"),
            "summary": validation.get("summary", record.get("error")),
        })
        print(f"{'PASS' if record['passed'] else 'FAIL'} {name}: {summary[-1]['summary']}")
    (args.results / "summary.json").write_text(json.dumps(summary, indent=2))
    ran = [s for s in summary if "skipped" not in s]
    return 0 if ran and all(s["passed"] for s in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
