"""Every panel's verdict rule says "not shown" where there is no effect, and judges real effects."""

from __future__ import annotations

import pytest

from graphtricks.experiment import PANELS, TrainConfig, experiment, verdict
from graphtricks.experiment.panels import judge, panels_for


def fake_run(seed: int, value: float) -> dict:
    """A run record carrying every measurement any panel reads, all driven by ``value``."""
    return {
        "seed": seed,
        "history": {"train_loss": [1.0, 0.5], "val_loss": [1.0, 0.6], "train_acc": [0.5, value], "val_acc": [0.5, value]},
        "diverged": None,
        "signal": {"layers": ["a", "b"], "act_std": [1.0, 10 ** (3 * value)], "grad_std": [1.0, 1.0]},
        "batch": {"2": value, "64": 0.9},
        "calibration": {"ece": value / 10, "confidence": [value], "accuracy": [value], "count": [10]},
    }


BETWEEN_RUNS = sorted(k for k, spec in PANELS.items() if spec.before_value is None)
WITHIN_RUNS = sorted(k for k, spec in PANELS.items() if spec.before_value is not None)


def uncertain_run(seed: int, deterministic: float, mc: float) -> dict:
    """A run carrying MC dropout's measurements: every figure of one side driven by one value."""
    side = lambda v: {"auroc": v, "calibration": {"ece": v / 10, "confidence": [v], "accuracy": [v], "count": [10]}}  # noqa: E731
    return {**fake_run(seed, deterministic), "uncertainty": {"deterministic": side(deterministic), "mc": side(mc)}}


@pytest.mark.parametrize("kind", BETWEEN_RUNS)
def test_no_effect_is_not_shown(kind):
    runs = [fake_run(s, v) for s, v in enumerate((0.80, 0.85, 0.90))]
    assert judge(kind, "claim", "v", runs, runs)["verdict"] == "not shown"
    swapped = [fake_run(s, v) for s, v in enumerate((0.90, 0.80, 0.85))]
    assert judge(kind, "claim", "v", runs, swapped)["verdict"] == "not shown"


@pytest.mark.parametrize("kind", WITHIN_RUNS)
def test_within_run_panels_compare_the_variants_own_two_readings(kind):
    baseline = [uncertain_run(s, 0.1, 0.1) for s in range(3)]  # the original: never read by these panels
    same = [uncertain_run(s, v, v) for s, v in enumerate((0.80, 0.85, 0.90))]
    assert judge(kind, "claim", "v", baseline, same)["verdict"] == "not shown"
    up = [uncertain_run(s, v, v + 0.3) for s, v in enumerate((0.50, 0.51, 0.52))]
    panel = judge(kind, "claim", "v", baseline, up)
    assert panel["verdict"] == ("held" if PANELS[kind].higher_is_better else "reversed")
    assert panel["before"] == [PANELS[kind].before_value(r) for r in up] and panel["before_name"] == "v, deterministic"


@pytest.mark.parametrize("kind", BETWEEN_RUNS)
def test_a_clear_effect_is_held_or_reversed(kind):
    low = [fake_run(s, v) for s, v in enumerate((0.20, 0.21, 0.22))]
    high = [fake_run(s, v) for s, v in enumerate((0.80, 0.81, 0.82))]
    better = "held" if PANELS[kind].higher_is_better else "reversed"
    worse = "reversed" if better == "held" else "held"
    assert judge(kind, "claim", "v", low, high)["verdict"] == better
    assert judge(kind, "claim", "v", high, low)["verdict"] == worse


def test_rule_floor_and_spread():
    assert verdict([0.5, 0.5], [0.505, 0.505], floor=0.01)["verdict"] == "not shown"  # below the floor
    assert verdict([0.5, 0.7], [0.7, 0.9], floor=0.01)["verdict"] == "not shown"  # within 2 std
    assert verdict([0.5], [0.6], floor=0.01)["verdict"] == "held"
    with pytest.raises(ValueError):
        verdict([float("nan")], [0.5])


def test_every_technique_has_a_curves_panel():
    for names in (["dropout"], ["residual"], ["init"], ["bn_to_ln"], ["label_smoothing"], ["warmup", "clip_grad"], ["precision"]):
        assert sum(k.startswith("curves") for k, _ in panels_for(names)) == 1


def test_a_technique_with_no_effect_is_not_shown_end_to_end():
    """Clipping at a norm no gradient reaches changes nothing: identical numbers, verdict not shown."""
    from tiny import WineMLP

    result = experiment(WineMLP, "wine", [("no-op-clip", [{"pass": "clip_grad", "max_norm": 1e9}])], seeds=2,
                        config=TrainConfig(epochs=2))
    (panel,) = result.panels
    assert panel["before"] == panel["after"]
    assert panel["verdict"] == "not shown"
