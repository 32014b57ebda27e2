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


def _curves(plt, panel, before, after, names):
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    epochs = np.arange(1, len(before[0]["history"]["val_acc"]) + 1)
    for ax, what in zip(axes, ("loss", "acc")):
        for runs, color, name in ((before, BEFORE, names[0]), (after, AFTER, names[1])):
            _band(ax, epochs, [r["history"][f"train_{what}"] for r in runs], color, f"{name} train", "--")
            _band(ax, epochs, [r["history"][f"val_{what}"] for r in runs], color, f"{name} val")
        ax.set_xlabel("epoch")
        ax.set_ylabel("cross-entropy" if what == "loss" else "accuracy")
        ax.grid(alpha=0.3)
    losses = np.asarray([r["history"][k] for r in (*before, *after) for k in ("train_loss", "val_loss")], dtype=float)
    if np.isfinite(losses).any() and (losses[np.isfinite(losses)] > 0).all():
        axes[0].set_yscale("log")  # a run that diverged leaves gaps (NaN), not a broken axis
    axes[1].legend(fontsize=7, loc="lower right")
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


def _calibration(plt, panel, before, after, names):
    fig, ax = plt.subplots(figsize=(5, 3.8))
    ax.plot([0, 1], [0, 1], ":", color="black", lw=1, label="perfect calibration")
    for runs, color, name in ((before, BEFORE, names[0]), (after, AFTER, names[1])):
        n = np.asarray([r["calibration"]["count"] for r in runs], dtype=float)
        conf = np.asarray([[c if c is not None else 0 for c in r["calibration"]["confidence"]] for r in runs])
        acc = np.asarray([[a if a is not None else 0 for a in r["calibration"]["accuracy"]] for r in runs])
        keep = n.sum(0) > 0
        total = np.where(keep, n.sum(0), 1)
        ece = np.mean([r["calibration"]["ece"] for r in runs])
        ax.plot(((conf * n).sum(0) / total)[keep], ((acc * n).sum(0) / total)[keep], "-o", color=color,
                label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


FIGURES = {"curves": _curves, "curves-train": _curves, "signal": _signal, "batch": _batch, "calibration": _calibration}


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
