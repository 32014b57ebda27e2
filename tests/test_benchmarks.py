"""benchmarks/run.py: every figure is measured and reported as finite positive ratios.

Runs the script's measurement functions on tiny models with few repetitions (the ``tiny``
preset), through its command line with ``--json``. Timing on a shared machine is noisy, so
the goals are not checked here: only that the JSON has the six figures, each with finite
positive numbers.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIGURES = (
    "rewrite_overhead",
    "rewrite_scaling",
    "train_step_overhead",
    "infer_overhead",
    "validate_vs_torch",
    "peak_rss_ratio",
)

pytest.importorskip("torchvision")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bench():
    """benchmarks/run.py imported as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("graphtricks_benchmarks", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_json_has_six_figures_with_finite_positive_ratios(bench, capsys):
    assert bench.main(["--preset", "tiny", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)  # stdout holds only the JSON

    assert set(FIGURES) <= set(results)
    assert results["machine"]["cpu_count"] >= 1 and results["machine"]["torch"]
    for name in FIGURES:
        figure = results[name]
        assert "error" not in figure, f"{name}: {figure.get('error')}"
        for key in ("median", "min", "max", "goal"):
            assert _positive(figure[key]), f"{name}.{key} = {figure[key]!r}"
        assert figure["min"] <= figure["median"] <= figure["max"], name
        assert figure["detail"], name
        for case, stats in figure["detail"].items():
            assert "error" not in stats, f"{name}/{case}: {stats['error']}"
            assert _positive(stats["median"]), f"{name}/{case}"
    rss = results["peak_rss_ratio"]["detail"]
    assert {"copy", "inplace"} <= set(rss)
    assert rss["copy"]["param_bytes"] > 0


def test_interleave_alternates_and_summarises_ratios(bench):
    calls = []

    def side(name, seconds):
        def run():
            calls.append(name)
            return seconds

        return run

    stats = bench.interleave(side("a", 2.0), side("b", 1.0), reps=2, warmup=1, inner=2)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert stats["median"] == stats["min"] == stats["max"] == 2.0
    assert stats["n"] == 2 and stats["a_s"] == 2.0 and stats["b_s"] == 1.0


def test_markdown_table_marks_missed_goals(bench):
    fake = {
        "rewrite_overhead": {"median": 2.0, "min": 1.5, "max": 3.0, "goal": 1.3, "headline": "m", "detail": {}},
        "rewrite_scaling": {"error": "RuntimeError: boom", "goal": 9.0},
    }
    table = bench.markdown_table(fake)
    assert "| `rewrite_overhead` (m) | 2.000 | 1.500–3.000 | ≤ 1.3 | **no** |" in table
    assert "error" in table and "rewrite_scaling" in table
