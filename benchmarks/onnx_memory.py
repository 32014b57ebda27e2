"""Peak resident memory and time of ``export_pair`` and ``validate_pair``, each in a fresh process.

Each step runs in its own subprocess; the figure is its peak RSS (``ru_maxrss``) above the RSS
it had after importing graphtricks and exporting a tiny model (the exporters' code loads on
first use) and before building the model, divided by the model's parameter bytes (the model
itself counts: 1.0 is the weights alone). Goal: <= 2.5. What the warm-up took is reported
beside (``warmup_mb``).

Usage::

    python benchmarks/onnx_memory.py mlp                 # 6 x Linear(4096, 4096) + head, 403 MB
    python benchmarks/onnx_memory.py mlp --external-data
    python benchmarks/onnx_memory.py llama               # ~650M-parameter Llama config, ~2.6 GB
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["WeightMLP", "MEMORY_GOAL", "MEMORY_MODELS", "build", "measure", "measure_model"]

MEMORY_GOAL = 2.5
# name -> (description, batch input shape)
MEMORY_MODELS = {
    "mlp": "6 x Linear(4096, 4096) + ReLU, head Linear(4096, 10): 403 MB float32",
    "llama": "transformers LlamaForCausalLM, hidden 2048, 12 layers, intermediate 5632, vocab 32000",
    "bert_3gb": "transformers BertModel, hidden 2048, 14 layers, intermediate 8192: 766M parameters, 3.1 GB",
    "tiny": "2 x Linear(64, 64) (tests)",
}


def _weight_mlp(width: int = 4096, depth: int = 6):
    from torch import nn

    layers: list = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


class WeightMLP:
    """Model spec of the 403 MB MLP (``benchmarks/onnx_memory.py:WeightMLP``): builds it."""

    def __new__(cls, width: int = 4096, depth: int = 6):
        return _weight_mlp(width, depth)


def build(name: str):
    """(model in eval mode, example inputs) for a name of ``MEMORY_MODELS``."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name in ("mlp", "tiny"):
        width, depth = (4096, 6) if name == "mlp" else (64, 2)
        return _weight_mlp(width, depth).eval(), (torch.randn(8, width),)
    if name == "bert_3gb":
        from transformers import BertConfig, BertModel

        config = BertConfig(hidden_size=2048, num_hidden_layers=14, intermediate_size=8192,
                            num_attention_heads=16)
        return BertModel(config).eval(), (torch.randint(0, 30522, (1, 32)),)
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            hidden_size=2048, num_hidden_layers=12, intermediate_size=5632, vocab_size=32000,
            num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256,
        )
        config._attn_implementation = "eager"
        model = LlamaForCausalLM(config).eval()
        model.config.use_cache = False
        return model, (torch.randint(0, 32000, (1, 16)),)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MEMORY_MODELS)}")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return _rss_mb()


def _warm_up(step: str) -> None:
    """Exports (and, for ``validate``, validates) a tiny model before the baseline is read, as the
    rewrite memory figure warms up: the first export loads torch.export, its tracer, the ONNX
    translator and onnxscript (about 250 MB of code and caches whatever the model; a 403 MB model
    read it as 0.65x), which is not memory per weight. The rows report it as ``warmup_mb``."""
    import graphtricks.onnx as gto

    model, inputs = build("tiny")
    with tempfile.TemporaryDirectory(prefix="gt-warm-") as folder:
        gto.export_pair(model, inputs, folder)
        if step == "validate":
            gto.validate_pair(model, inputs, folder, device="cpu")


def _child(name: str, step: str, folder: str, external: bool) -> dict:
    """Runs one step in this process and measures it."""
    import warnings

    warnings.simplefilter("ignore")
    import torch

    import graphtricks.onnx as gto

    before_warm_up = _current_rss_mb()
    _warm_up(step)
    warm_up = _current_rss_mb() - before_warm_up
    base = _rss_mb()
    model, inputs = build(name)
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    with_model = _rss_mb()
    start = time.perf_counter()
    if step == "export":
        result = gto.export_pair(model, inputs, folder, external_data=external)
        extra = {"data_file": result.data_path is not None}
    else:
        report = gto.validate_pair(model, inputs, folder, device="cpu")
        failed = [c.message for c in report.checks if not c.passed]
        extra = {"passed": report.passed, "failed": failed[:3],
                 "data_file": (Path(folder) / "model.data").is_file()}
    seconds = time.perf_counter() - start
    peak = _rss_mb()
    del torch
    return {
        "model": name, "step": step, "external_data": external, "seconds": round(seconds, 1),
        "param_mb": round(params, 1), "baseline_mb": round(base, 1),
        "model_rss_mb": round(with_model - base, 1), "peak_mb": round(peak, 1),
        "warmup_mb": round(warm_up, 1),
        "ratio": round((peak - base) / params, 2), "goal": MEMORY_GOAL, **extra,
    }


def measure(name: str, step: str, folder: str, external: bool = False) -> dict:
    """Runs one step in a fresh interpreter; its measurement."""
    command = [sys.executable, __file__, name, "--child", step, "--folder", folder]
    if external:
        command.append("--external-data")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"model": name, "step": step, "external_data": external, "error": tail,
                "returncode": done.returncode}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_model(name: str, external: bool = False) -> list[dict]:
    """Export, then validation, of one model, each in its own process."""
    with tempfile.TemporaryDirectory(prefix="gt-mem-") as folder:
        first = measure(name, "export", folder, external)
        if "error" in first:
            return [first]
        return [first, measure(name, "validate", folder, external)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MEMORY_MODELS))
    parser.add_argument("--external-data", action="store_true")
    parser.add_argument("--child", choices=("export", "validate"))
    parser.add_argument("--folder")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.model, args.child, args.folder, args.external_data)))
        return
    for row in measure_model(args.model, args.external_data):
        print(json.dumps(row))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
