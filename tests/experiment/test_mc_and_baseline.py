"""MC dropout in experiments (held-out classes, uncertainty panels) and judging variants against a baseline variant."""

from __future__ import annotations

import json

import pytest
import torch

from graphtricks.experiment import DataError, ExperimentError, TrainConfig, experiment, load_data
from graphtricks.experiment.panels import claim_key, panels_for
from graphtricks.experiment.probes import ROC_GRID, auroc, roc_curve
from graphtricks.experiment.techniques import apply_technique


def test_known_classes_hold_the_others_out_of_training_and_validation():
    full = load_data("digits")
    data = load_data("digits", known_classes=5)
    assert data.n_classes == 5
    assert int(data.y_train.max()) == 4 and int(data.y_val.max()) == 4
    assert len(data.x_val) + len(data.x_unseen) == len(full.x_val)
    assert len(data.x_train) == int((full.y_train < 5).sum())
    # the unseen examples are exactly the validation examples of classes 5–9
    assert torch.equal(data.x_unseen, full.x_val[full.y_val >= 5])
    assert data.reshaped((1, 8, 8)).x_unseen.shape == (len(data.x_unseen), 1, 8, 8)
    for bad in (1, 10, True):
        with pytest.raises(DataError, match="known_classes"):
            load_data("digits", known_classes=bad)


def test_auroc_and_roc_follow_their_definitions():
    neg, pos = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.35, 0.5, 0.3])
    # pairs pos > neg: 0.35 beats 3, 0.5 beats 4, 0.3 beats 2 and ties 1 → (9 + 0.5) / 12
    assert auroc(neg, pos) == pytest.approx(9.5 / 12)
    assert auroc(pos, pos) == pytest.approx(0.5)
    assert auroc(torch.zeros(3), torch.ones(2)) == 1.0
    curve = roc_curve(neg, pos)
    assert len(curve) == len(ROC_GRID) and curve[0] == 0.0 and curve[-1] == 1.0
    assert curve == sorted(curve)
    with pytest.raises(ExperimentError):
        auroc(torch.zeros(0), pos)


def test_mc_dropout_technique_and_claims():
    config = apply_technique(TrainConfig(), {"pass": "mc_dropout", "samples": 30})
    assert config.mc_samples == 30
    with pytest.raises(ExperimentError, match="samples"):
        apply_technique(TrainConfig(), {"pass": "mc_dropout", "samples": 1})
    kinds = [k for k, _ in panels_for([{"pass": "dropout", "p": 0.5}, {"pass": "mc_dropout", "samples": 30}])]
    assert kinds == ["curves", "unseen", "calibration-mc"]
    assert claim_key({"pass": "residual", "blocks": ["b"], "gate": "zero-branch"}) == "residual.gate=zero-branch"
    assert claim_key({"pass": "residual", "gate": "none"}) == "residual"


def test_mc_dropout_experiment_scores_the_same_weights_both_ways(tmp_path):
    from tiny import TinyMLP

    def five():
        return TinyMLP(classes=5)

    variant = ("mc", [{"pass": "dropout", "p": 0.5}, {"pass": "mc_dropout", "samples": 4}])
    result = experiment(five, "digits", [variant], seeds=2, known_classes=5, train_size=200,
                        config=TrainConfig(epochs=1), out=tmp_path / "r")
    panels = {p["kind"]: p for p in result.panels}
    assert set(panels) == {"curves", "unseen", "calibration-mc"}
    runs = result.runs["mc"]
    unseen = panels["unseen"]
    # the verdict compares the variant's own deterministic and MC numbers, seed by seed
    assert unseen["before"] == [r["uncertainty"]["deterministic"]["auroc"] for r in runs]
    assert unseen["after"] == [r["uncertainty"]["mc"]["auroc"] for r in runs]
    assert unseen["before_name"] == "mc, deterministic"
    assert panels["calibration-mc"]["after"] == [r["uncertainty"]["mc"]["calibration"]["ece"] for r in runs]
    assert "mc" not in result.runs["original"][0]["uncertainty"]  # the original is only read deterministically
    assert all(0 <= v <= 1 for p in result.panels for v in (*p["before"], *p["after"]))
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert {"unseen-mc.png", "calibration-mc-mc.png"} <= set(saved["figures"])


def test_uncertainty_panels_need_held_out_classes(recipe):
    from tiny import TinyMLP

    variant = ("mc", [{"pass": "dropout", "p": 0.5}, {"pass": "mc_dropout", "samples": 4}])
    with pytest.raises(ExperimentError, match="known_classes"):
        experiment(TinyMLP, "digits", [variant], seeds=1, train_size=50, config=TrainConfig(epochs=1))


def test_a_variant_can_be_the_baseline(tmp_path):
    from tiny import DeepMLP

    variants = [("identity", [{"pass": "residual", "blocks": ["blocks.*"], "shortcut": "identity"}]),
                ("gated", [{"pass": "residual", "blocks": ["blocks.*"], "shortcut": "identity", "gate": "zero-branch"}])]
    result = experiment(DeepMLP, "digits", variants, seeds=2, baseline="identity", train_size=100,
                        config=TrainConfig(epochs=1), out=tmp_path / "r")
    assert set(result.runs) == {"identity", "gated"}  # the original is not trained
    assert {p["variant"] for p in result.panels} == {"gated"}
    curves = next(p for p in result.panels if p["kind"] == "curves-train")
    assert curves["baseline"] == curves["before_name"] == "identity"
    assert curves["claim"].startswith("a branch gate starting at zero")
    assert curves["before"] == [r["history"]["train_acc"][-1] for r in result.runs["identity"]]
    steps = result.runs["gated"][0]["history"]["step_loss"]
    assert len(steps) == 100 // 32 + 1 and all(v > 0 for v in steps)  # one loss per step
    with pytest.raises(ExperimentError, match="baseline"):
        experiment(DeepMLP, "digits", variants, seeds=1, baseline="nope", config=TrainConfig(epochs=1))
