"""Panels: what each technique claims, the one number per seed that tests it, and its verdict.

A panel compares the original model ("before") with one variant ("after") over the same
seeds. :data:`PANELS` holds one entry per kind of evidence; :func:`panels_for` picks the
kinds a variant's techniques call for, and :func:`judge` computes the verdicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from graphtricks.experiment.verdict import verdict

__all__ = ["CLAIMS", "PANELS", "PanelKind", "judge", "panels_for", "signal_decades"]


def signal_decades(std: list[float]) -> float:
    """How many decades the activation std drifts from the first to the last layer (|log10 ratio|, capped at 300)."""
    if len(std) < 2 or not std[0] > 0 or not std[-1] > 0:
        return 300.0
    value = abs(math.log10(std[-1] / std[0])) if math.isfinite(std[-1]) and math.isfinite(std[0]) else 300.0
    return min(value, 300.0)


@dataclass(frozen=True)
class PanelKind:
    """One kind of evidence.

    Attributes:
        title: the figure's title. metric: what the verdict compares (for the report).
        value: one run (one seed) → the metric. higher_is_better, floor, unit: the verdict rule.
        needs: the extra measurement runs must carry ("signal", "calibration", "batch"), or "".
    """

    title: str
    metric: str
    value: Callable[[dict[str, Any]], float]
    higher_is_better: bool
    floor: float
    unit: str
    needs: str = ""


PANELS: dict[str, PanelKind] = {
    "curves": PanelKind("loss and accuracy per epoch", "final validation accuracy",
                        lambda r: r["history"]["val_acc"][-1], True, 0.01, "0.01 accuracy"),
    "curves-train": PanelKind("loss and accuracy per epoch", "final training accuracy",
                              lambda r: r["history"]["train_acc"][-1], True, 0.01, "0.01 accuracy"),
    "signal": PanelKind("activation and gradient std per layer at initialisation",
                        "|log10(last / first layer activation std)| at init",
                        lambda r: signal_decades(r["signal"]["act_std"]), False, 0.5, "0.5 decades", "signal"),
    "batch": PanelKind("validation accuracy against batch size", "validation accuracy at the smallest batch size",
                       lambda r: r["batch"][min(r["batch"], key=int)], True, 0.01, "0.01 accuracy", "batch"),
    "calibration": PanelKind("reliability diagram (validation)", "expected calibration error",
                             lambda r: r["calibration"]["ece"], False, 0.01, "0.01 ECE", "calibration"),
}

# technique → (panel kind, claim); a variant gets one curves panel (from its first technique
# listed here) plus every other kind its techniques name.
CLAIMS: dict[str, list[tuple[str, str]]] = {
    "residual": [("curves-train", "residual shortcuts let the deep network train: higher training accuracy"),
                 ("signal", "residual shortcuts keep the signal steady through depth")],
    "init": [("signal", "the initialiser keeps the activation scale steady through depth"),
             ("curves", "the initialiser trains to a higher validation accuracy")],
    "dropout": [("curves", "dropout reduces overfitting: higher validation accuracy")],
    "bn_to_ln": [("batch", "LayerNorm beats BatchNorm at tiny batches"),
                 ("curves", "LayerNorm reaches a higher validation accuracy at the run's batch size")],
    "warmup": [("curves", "LR warmup rescues unstable training: higher validation accuracy")],
    "clip_grad": [("curves", "gradient clipping rescues unstable training: higher validation accuracy")],
    "schedule": [("curves", "the LR schedule reaches a higher validation accuracy")],
    "label_smoothing": [("curves", "label smoothing regularises: higher validation accuracy"),
                        ("calibration", "label smoothing improves calibration: lower expected calibration error")],
    "l1": [("curves", "the L1 penalty regularises: higher validation accuracy")],
    "l2": [("curves", "the L2 penalty regularises: higher validation accuracy")],
    "precision": [("curves", "the precision setting reaches a higher validation accuracy")],
    "loss_weights": [("curves", "the loss weights reach a higher validation accuracy")],
    "optimizer": [("curves", "the optimiser setting reaches a higher validation accuracy")],
}


def panels_for(techniques: list[str]) -> list[tuple[str, str]]:
    """The (kind, claim) pairs a variant with these techniques (pass and loop names, in order) is judged by."""
    chosen: list[tuple[str, str]] = []
    for name in techniques:
        for kind, claim in CLAIMS.get(name, [("curves", f"{name} raises the validation accuracy")]):
            is_curves = kind.startswith("curves")
            if is_curves and any(k.startswith("curves") for k, _ in chosen):
                continue
            if not any(k == kind for k, _ in chosen):
                chosen.append((kind, claim))
    if not any(k.startswith("curves") for k, _ in chosen):
        chosen.insert(0, ("curves", "the variant raises the validation accuracy"))
    return chosen


def judge(kind: str, claim: str, variant: str, before: list[dict], after: list[dict]) -> dict[str, Any]:
    """One panel's record: claim, metric per seed on both sides, and the verdict."""
    spec = PANELS[kind]
    b, a = [spec.value(r) for r in before], [spec.value(r) for r in after]
    return {"kind": kind, "variant": variant, "title": spec.title, "claim": claim, "metric": spec.metric,
            "before": b, "after": a, **verdict(b, a, higher_is_better=spec.higher_is_better,
                                               floor=spec.floor, unit=spec.unit)}
