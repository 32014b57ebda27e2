"""The experiment's folder: ``report.html`` (self-contained, PNGs inline), one PNG per figure, ``results.json``.

The folder is written atomically: everything goes to a hidden sibling first, which is renamed
into place only when complete, so a failure leaves nothing behind.
"""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from graphtricks.experiment.errors import ExperimentError, require

__all__ = ["check_out", "figure_name", "render_html", "require_plots", "write_report"]

COLORS = {"held": "#1a7f37", "not shown": "#6e7781", "reversed": "#cf222e"}


def require_plots() -> None:
    """Fail at once (before any training) when matplotlib is missing."""
    require("matplotlib")


def check_out(out: Path, force: bool) -> None:
    """Refuse an output path that is a file, or a non-empty folder without ``force``, or has no
    parent (the same rule as ``gt.save``, raised as an :class:`ExperimentError`)."""
    from graphtricks.errors import OutputError
    from graphtricks.io.folder import check_output_dir

    try:
        check_output_dir(out, force)
    except OutputError as e:
        raise ExperimentError(str(e)) from e


def figure_name(panel: dict[str, Any]) -> str:
    """The PNG file of a panel: ``<kind>-<variant>.png`` with a safe variant name."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in panel["variant"])
    return f"{panel['kind']}-{safe}.png"


def _clean(value):
    """JSON-safe: non-finite floats become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def render_html(result, figures: dict[str, bytes]) -> str:
    """The report page: summary table of verdicts, then each panel with its figure inline."""
    e = html.escape
    rows, sections = [], []
    for p in result.panels:
        color = COLORS[p["verdict"]]
        verdict = f'<b style="color:{color}">{e(p["verdict"])}</b>'
        change = (f'{e(p["before_name"])} {_fmt(p["before_mean"])} → {_fmt(p["after_mean"])} '
                  f'(Δ {p["difference"]:+.3g}, ±{_fmt(p["spread"])})')
        rows.append(f"<tr><td>{e(p['variant'])}</td><td>{e(p['claim'])}</td><td>{e(p['metric'])}</td>"
                    f"<td>{change}</td><td>{verdict}</td></tr>")
        png = base64.b64encode(figures[p["figure"]]).decode()
        per_seed = ", ".join(f"{_fmt(b)} → {_fmt(a)}" for b, a in zip(p["before"], p["after"]))
        sections.append(
            f'<section><h2>{e(p["variant"])}: {e(p["title"])}</h2>'
            f'<p class="claim">Claim: {e(p["claim"])}. Verdict: {verdict}.</p>'
            f'<img src="data:image/png;base64,{png}" alt="{e(p["figure"])}" data-figure="{e(p["figure"])}">'
            f'<p>{e(p["metric"])}: {e(p["before_name"])} {_fmt(p["before_mean"])}, {e(p["variant"])} {_fmt(p["after_mean"])}; '
            f'difference {p["difference"]:+.3g}, larger std over seeds {_fmt(p["spread"])}, margin {_fmt(p["margin"])}. '
            f'Per seed ({e(p["before_name"])} → {e(p["variant"])}): {e(per_seed)}.</p>'
            f'<p class="rule">Rule: {e(p["rule"])}.</p></section>')
    variants = "".join(
        f"<li><b>{e(v['name'])}</b>: {e(json.dumps(v.get('passes', []) + v.get('techniques', [])))}"
        f" — {v['parameters']:,} parameters</li>" for v in result.variants)
    config = ", ".join(f"{k}={v}" for k, v in result.config.items() if v not in ((), [], None))
    data = result.data
    notes = "; ".join(data["notes"])
    diverged = [f"{n} (seed {r['seed']})" for n, rs in result.runs.items() for r in rs if r["diverged"] is not None]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>graphtricks experiment: {e(result.model)}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#1f2328}}
table{{border-collapse:collapse;width:100%;font-size:14px}}td,th{{border-bottom:1px solid #d0d7de;padding:4px 6px;text-align:left}}
img{{max-width:100%}}section{{margin-top:2em}}.rule{{color:#57606a;font-size:13px}}.claim{{font-size:15px}}
</style></head><body>
<h1>{e(result.model)} on {e(data['name'])}</h1>
<p>{data['train']} training and {data['val']} validation examples, {data['classes']} classes, {_layout(data['layout'])}{'; ' + e(notes) if notes else ''}.
Seeds {', '.join(map(str, result.seeds))}: every variant starts from the original model built under the same seed and sees the same batches in the same order. Settings: {e(config)}. {result.seconds:.0f} CPU seconds.</p>
{'<p><b>Diverged:</b> ' + e(', '.join(diverged)) + '</p>' if diverged else ''}
<h2>Verdicts</h2>
<table><tr><th>variant</th><th>claim</th><th>metric</th><th>before → variant (±std)</th><th>verdict</th></tr>{''.join(rows)}</table>
<ul>{variants}</ul>
{''.join(sections)}
</body></html>
"""


def _layout(shape: list[int]) -> str:
    """What one example is: ``64 features``, or ``inputs of shape 1×8×8``."""
    if len(shape) == 1:
        return f"{shape[0]} feature" + "s" * (shape[0] != 1)
    return "inputs of shape " + "×".join(map(str, shape))


def write_report(result, out: Path, *, force: bool = False) -> Path:
    """Draw every panel's figure and write the folder atomically; returns ``out``.

    Raises:
        ExperimentError: ``out`` is a file, a non-empty folder without ``force``, or has no parent.
    """
    from graphtricks.experiment.plots import draw

    out = Path(out)
    check_out(out, force)
    figures: dict[str, bytes] = {}
    for p in result.panels:
        p["figure"] = figure_name(p)
        baseline = p.get("baseline", "original")
        figures[p["figure"]] = draw(p, result.runs[baseline], result.runs[p["variant"]], (baseline, p["variant"]))
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, png in figures.items():
            (staging / name).write_bytes(png)
        payload = {**_clean(result.to_dict()), "figures": list(figures)}
        (staging / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
        (staging / "report.html").write_text(render_html(result, figures))
        staging.chmod(0o755)
        if out.exists():
            trash = out.parent / f".{out.name}.old"
            out.rename(trash)
            staging.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
