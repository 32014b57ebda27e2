"""Regenerate the README's performance table from a results file (never typed by hand).

Usage::

    python benchmarks/readme_table.py benchmarks/results/cpu-2026-11-27-quick.json \\
        --memory benchmarks/results/onnx-memory-2026-11-27.json

Replaces what lies between ``<!-- perf-table:start -->`` and ``<!-- perf-table:end -->`` in
README.md with the figures of ``run.py --json`` (``markdown_table``) and, with ``--memory``,
the rows of ``onnx_memory.py`` (one JSON object per line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import markdown_table  # noqa: E402

START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"


def memory_table(rows: list[dict]) -> str:
    """Peak RSS of export/validate above the interpreter, ÷ parameter bytes, one row per step."""
    lines = [
        "| model | step | weights | peak RSS − baseline ÷ parameter bytes | time | goal | met? |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        where = "model.data" if r.get("external_data") or r.get("data_file") else "in the .onnx"
        if "error" in r:
            lines.append(f"| {r['model']} | {r['step']} | {where} | error: {r['error'][:90]} | – | ≤ 2.5 | – |")
            continue
        met = "yes" if r["ratio"] <= r["goal"] else "**no**"
        lines.append(
            f"| {r['model']} ({r['param_mb']:.0f} MiB) | {r['step']} | {where} | {r['ratio']:.2f} "
            f"| {r['seconds']:.1f} s | ≤ {r['goal']:g} | {met} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--memory", type=Path)
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    figures = results
    block = [f"Figures of `{args.results.relative_to(ROOT) if args.results.is_absolute() else args.results}`"
             f" (preset `{results.get('preset', {}).get('name', '?')}`):", "", markdown_table(figures)]
    if args.memory:
        rows = [json.loads(line) for line in args.memory.read_text().splitlines() if line.strip()]
        block += ["", f"Export and validation memory (`{args.memory}`, each step in a fresh process):",
                  "", memory_table(rows)]
    text = args.readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{args.readme} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    args.readme.write_text(head + START + "\n" + "\n".join(block) + "\n" + END + tail)


if __name__ == "__main__":
    main()
