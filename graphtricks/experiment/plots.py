"""Figures, one per panel, drawn with matplotlib (the ``report`` extra) off-screen.

Each function takes the panel record and the runs (one per seed) of both sides and returns
a matplotlib Figure; lines are means over seeds and bands span ±1 standard deviation.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from graphtricks.experiment.errors import require

__all__ = ["FIGURES", "draw"]

BEFORE, AFTER = "#7f7f7f", "#1f77b4"


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed), or the install hint."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg", force=True)
    return require("matplotlib.pyplot")


def _band(ax, x, rows, color, label, style="-"):
    """Mean line and ±1 std band of ``rows`` (one row per seed)."""
    data = np.asarray(rows, dtype=float)
    with warnings.catch_warnings():  # a diverged run is all NaN: a gap in the line, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, std = np.nanmean(data, 0), np.nanstd(data, 0)
    ax.plot(x, mean, style, color=color, label=label, lw=1.6)
    if len(data) > 1:
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.18, lw=0)


def _smoothed(rows: list[list[float]], window: int) -> np.ndarray:
    """Each row's running mean over ``window`` steps (rows padded with NaN to one length)."""
    width = max(len(r) for r in rows)
    data = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        data[i, :len(r)] = r
    kernel = np.ones(window) / window
    return np.asarray([np.convolve(r, kernel, mode="valid") for r in data])


def _curves(plt, panel, before, after, names):
    per_step = "step_loss" in before[0]["history"] and "step_loss" in after[0]["history"]
    fig, axes = plt.subplots(1, 3 if per_step else 2, figsize=(13 if per_step else 9, 3.4))
    epochs = np.arange(1, len(before[0]["history"]["val_acc"]) + 1)
    for ax, what in zip(axes, ("loss", "acc")):
        for runs, color, name in ((before, BEFORE, names[0]), (after, AFTER, names[1])):
            _band(ax, epochs, [r["history"][f"train_{what}"] for r in runs], color, f"{name} train", "--")
            _band(ax, epochs, [r["history"][f"val_{what}"] for r in runs], color, f"{name} val")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("cross-entropy" if what == "loss" else "accuracy")
        ax.grid(alpha=0.3)
    losses = np.asarray([r["history"][k] for r in (*before, *after) for k in ("train_loss", "val_loss")], dtype=float)
    if np.isfinite(losses).any() and (losses[np.isfinite(losses)] > 0).all():
        axes[0].set_yscale("log")  # a run that diverged leaves gaps (NaN), not a broken axis
    axes[1].legend(fontsize=7, loc="lower right")
    if per_step:
        window = max(1, min(10, *(len(r["history"]["step_loss"]) for r in (*before, *after))))
        for runs, color, name in ((before, BEFORE, names[0]), (after, AFTER, names[1])):
            rows = _smoothed([r["history"]["step_loss"] for r in runs], window)
            _band(axes[2], np.arange(window, rows.shape[1] + window), rows, color, name)
        axes[2].set_xlabel("training step")
        axes[2].set_ylabel(f"training loss (mean of {window} steps)")
        axes[2].set_yscale("log")
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=7)
    return fig


def _signal(plt, panel, before, after, names):
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, label in ((axes[0], "act_std", "activation std (forward)"), (axes[1], "grad_std", "gradient std (backward)")):
        for runs, color, name in ((before, BEFORE, names[0]), (after, AFTER, names[1])):
            rows = np.clip(np.asarray([r["signal"][key] for r in runs], dtype=float), 1e-30, 1e30)
            _band(ax, np.arange(1, rows.shape[1] + 1), np.log10(rows), color, name, "-o")
        ax.set_xlabel("layer (forward order)")
        ax.set_ylabel(f"log10 {label}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


def _batch(plt, panel, before, after, names):
    fig, ax = plt.subplots(figsize=(5, 3.4))
    sizes = sorted(before[0]["batch"], key=int)
    for runs, color, name in ((before, BEFORE, names[0]), (after, AFTER, names[1])):
        rows = np.asarray([[r["batch"][s] for s in sizes] for r in runs], dtype=float)
        ax.errorbar([int(s) for s in sizes], rows.mean(0), yerr=rows.std(0), color=color, label=name, marker="o", capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("final validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _reliability(ax, records: list[dict], color: str, name: str, style: str = "-o") -> None:
    """One reliability curve from :func:`~graphtricks.experiment.probes.calibration` records (one per seed), pooled."""
    n = np.asarray([r["count"] for r in records], dtype=float)
    conf = np.asarray([[c if c is not None else 0 for c in r["confidence"]] for r in records])
    acc = np.asarray([[a if a is not None else 0 for a in r["accuracy"]] for r in records])
    keep = n.sum(0) > 0
    total = np.where(keep, n.sum(0), 1)
    ece = np.mean([r["ece"] for r in records])
    ax.plot(((conf * n).sum(0) / total)[keep], ((acc * n).sum(0) / total)[keep], style, color=color,
            label=f"{name} (ECE {ece:.3f})")


def _reliability_axes(ax) -> None:
    ax.plot([0, 1], [0, 1], ":", color="black", lw=1, label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)


def _calibration(plt, panel, before, after, names):
    fig, ax = plt.subplots(figsize=(5, 3.8))
    _reliability_axes(ax)
    for runs, color, name in ((before, BEFORE, names[0]), (after, AFTER, names[1])):
        _reliability(ax, [r["calibration"] for r in runs], color, name)
    ax.legend(fontsize=7)
    return fig


CONTEXT = "#c0c0c0"


def _uncertainty_sides(before, after, names):
    """(records, color, label, style) of each line: the baseline (context), the variant deterministic and MC."""
    sides = []
    if before and "uncertainty" in before[0] and before is not after:
        sides.append(([r["uncertainty"]["deterministic"] for r in before], CONTEXT, f"{names[0]} (deterministic)", "--"))
    sides.append(([r["uncertainty"]["deterministic"] for r in after], BEFORE, f"{names[1]}, deterministic", "-"))
    sides.append(([r["uncertainty"]["mc"] for r in after], AFTER, f"{names[1]}, MC dropout", "-"))
    return sides


def _unseen(plt, panel, before, after, names):
    from graphtricks.experiment.probes import ROC_GRID

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    sides = _uncertainty_sides(before, after, names)
    for records, color, label, style in sides:
        auc = np.mean([r["auroc"] for r in records])
        _band(axes[0], np.asarray(ROC_GRID), [r["roc"] for r in records], color, f"{label} (AUROC {auc:.3f})", style)
    axes[0].plot([0, 1], [0, 1], ":", color="black", lw=1)
    axes[0].set_xlabel("false-positive rate (known classes flagged)")
    axes[0].set_ylabel("true-positive rate (unseen classes flagged)")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    width = 0.8 / len(sides)
    for i, (records, color, label, _) in enumerate(sides):
        rows = np.asarray([[r["entropy_known"], r["entropy_unseen"]] for r in records], dtype=float)
        axes[1].bar(np.arange(2) + (i - (len(sides) - 1) / 2) * width, rows.mean(0), width, yerr=rows.std(0),
                    color=color, label=label, capsize=3)
    axes[1].set_xticks([0, 1], ["known classes", "unseen classes"])
    axes[1].set_ylabel("mean predictive entropy (nats)")
    axes[1].grid(alpha=0.3, axis="y")
    axes[1].legend(fontsize=7)
    return fig


def _calibration_mc(plt, panel, before, after, names):
    fig, ax = plt.subplots(figsize=(6.6, 3.8))
    _reliability_axes(ax)
    for records, color, label, style in _uncertainty_sides(before, after, names):
        _reliability(ax, [r["calibration"] for r in records], color, label, style + "o")
    ax.legend(fontsize=7)
    return fig


FIGURES = {"curves": _curves, "curves-train": _curves, "signal": _signal, "batch": _batch, "calibration": _calibration,
           "unseen": _unseen, "calibration-mc": _calibration_mc}


def draw(panel: dict[str, Any], before: list[dict], after: list[dict], names: tuple[str, str]) -> bytes:
    """The panel's figure as PNG bytes, titled with its claim and verdict."""
    import io

    plt = _pyplot()
    fig = FIGURES[panel["kind"]](plt, panel, before, after, names)
    try:
        fig.suptitle(f"{panel['claim']} — {panel['verdict']}", fontsize=9)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
        return buffer.getvalue()
    finally:
        plt.close(fig)
