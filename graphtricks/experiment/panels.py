"""Panels: what each technique claims, the one number per seed that tests it, and its verdict.

A panel compares the original model ("before") with one variant ("after") over the same
seeds — or, for a kind with ``before_value`` (MC dropout), the variant's own weights read two
ways. :data:`PANELS` holds one entry per kind of evidence; :func:`panels_for` picks the
kinds a variant's techniques call for, and :func:`judge` computes the verdicts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from graphtricks.experiment.verdict import verdict

__all__ = ["CLAIMS", "PANELS", "PanelKind", "claim_key", "judge", "panels_for", "signal_decades"]


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
        needs: the extra measurement runs must carry ("signal", "calibration", "batch",
            "uncertainty", "steps": the loss of every training step), or "".
        before_value: when set, the "before" side is this value of the *variant's* runs (the same
            trained weights read another way), named ``before_name``; otherwise the baseline's runs.
    """

    title: str
    metric: str
    value: Callable[[dict[str, Any]], float]
    higher_is_better: bool
    floor: float
    unit: str
    needs: str = ""
    before_value: Callable[[dict[str, Any]], float] | None = None
    before_name: str = ""


PANELS: dict[str, PanelKind] = {
    "curves": PanelKind("loss and accuracy per epoch", "final validation accuracy",
                        lambda r: r["history"]["val_acc"][-1], True, 0.01, "0.01 accuracy"),
    "curves-train": PanelKind("loss and accuracy per epoch, training loss per step", "final training accuracy",
                              lambda r: r["history"]["train_acc"][-1], True, 0.01, "0.01 accuracy", "steps"),
    "signal": PanelKind("activation and gradient std per layer at initialisation",
                        "|log10(last / first layer activation std)| at init",
                        lambda r: signal_decades(r["signal"]["act_std"]), False, 0.5, "0.5 decades", "signal"),
    "batch": PanelKind("validation accuracy against batch size", "validation accuracy at the smallest batch size",
                       lambda r: r["batch"][min(r["batch"], key=int)], True, 0.01, "0.01 accuracy", "batch"),
    "calibration": PanelKind("reliability diagram (validation)", "expected calibration error",
                             lambda r: r["calibration"]["ece"], False, 0.01, "0.01 ECE", "calibration"),
    "unseen": PanelKind("unseen-class detection by predictive entropy (ROC, validation)",
                        "AUROC of predictive entropy, held-out classes against known ones",
                        lambda r: r["uncertainty"]["mc"]["auroc"], True, 0.01, "0.01 AUROC", "uncertainty",
                        lambda r: r["uncertainty"]["deterministic"]["auroc"], "deterministic"),
    "calibration-mc": PanelKind("reliability diagram, known classes (validation)", "expected calibration error",
                                lambda r: r["uncertainty"]["mc"]["calibration"]["ece"], False, 0.01, "0.01 ECE",
                                "uncertainty", lambda r: r["uncertainty"]["deterministic"]["calibration"]["ece"],
                                "deterministic"),
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
    "mc_dropout": [("unseen", "MC dropout's entropy flags unseen classes better than the deterministic softmax: "
                              "higher AUROC"),
                   ("calibration-mc", "the MC mean is better calibrated than the deterministic prediction: lower ECE")],
    # a pass's option can carry claims of its own: "<pass>.<option>=<value>" wins over "<pass>"
    "residual.gate=zero-branch": [
        ("curves-train", "a branch gate starting at zero (H = α·F + S) lets the deep net train: higher train accuracy"),
        ("signal", "a branch gate starting at zero keeps the signal steady through depth")],
}


def claim_key(entry: str | dict[str, Any]) -> str:
    """The :data:`CLAIMS` key of a recipe entry: ``"<pass>.<option>=<value>"`` where one is listed, else its name."""
    if isinstance(entry, str):
        return entry
    name = entry.get("pass", "")
    for option, value in entry.items():
        key = f"{name}.{option}={value}"
        if option != "pass" and key in CLAIMS:
            return key
    return name


def panels_for(techniques: list[str] | list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The (kind, claim) pairs a variant with these techniques (pass and loop names, or their recipe
    entries, in order) is judged by."""
    chosen: list[tuple[str, str]] = []
    for entry in techniques:
        name = claim_key(entry)
        for kind, claim in CLAIMS.get(name, [("curves", f"{name} raises the validation accuracy")]):
            is_curves = kind.startswith("curves")
            if is_curves and any(k.startswith("curves") for k, _ in chosen):
                continue
            if not any(k == kind for k, _ in chosen):
                chosen.append((kind, claim))
    if not any(k.startswith("curves") for k, _ in chosen):
        chosen.insert(0, ("curves", "the variant raises the validation accuracy"))
    return chosen


def judge(kind: str, claim: str, variant: str, before: list[dict], after: list[dict],
          baseline: str = "original") -> dict[str, Any]:
    """One panel's record: claim, metric per seed on both sides, and the verdict.

    ``before`` are the runs of ``baseline`` (the original model, or the variant named as the
    baseline); a kind with ``before_value`` reads its "before" side from ``after`` instead.
    """
    spec = PANELS[kind]
    a = [spec.value(r) for r in after]
    b = [spec.before_value(r) for r in after] if spec.before_value else [spec.value(r) for r in before]
    before_name = f"{variant}, {spec.before_name}" if spec.before_value else baseline
    return {"kind": kind, "variant": variant, "baseline": baseline, "before_name": before_name, "title": spec.title,
            "claim": claim, "metric": spec.metric, "before": b, "after": a,
            **verdict(b, a, higher_is_better=spec.higher_is_better, floor=spec.floor, unit=spec.unit)}
