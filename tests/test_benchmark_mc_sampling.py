"""benchmarks/mc_sampling.py: the tiled-vs-loop figure is measured and reported as finite positive ratios.

Runs the script on its ``tiny`` preset through its command line with ``--json``; timing on a
shared machine is noisy, so the goal is not checked here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("onnxruntime")


def test_mc_sampling_benchmark_reports_a_finite_ratio_per_case(capsys):
    spec = importlib.util.spec_from_file_location("graphtricks_mc_bench", ROOT / "benchmarks" / "mc_sampling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert module.main(["--preset", "tiny", "--json"]) == 0
    finally:
        sys.modules.pop(spec.name, None)
        sys.modules.pop("run", None)
    figure = json.loads(capsys.readouterr().out)["mc_sampling"]
    assert set(figure["detail"]) == {"mlp-torch", "mlp-onnx"}
    for name, case in figure["detail"].items():
        assert "error" not in case, f"{name}: {case.get('error')}"
        for key in ("median", "min", "max", "a_s", "b_s"):
            assert math.isfinite(case[key]) and case[key] > 0, f"{name}.{key} = {case[key]!r}"
    assert figure["min"] <= figure["median"] <= figure["max"]
