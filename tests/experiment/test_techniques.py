"""The training-loop helpers: schedules, clipping, penalties by glob, autocast, multi-head losses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphtricks.experiments import ExperimentError, TrainConfig, autocast, clip, experiment, lr_factor, multi_head_loss, penalty
from graphtricks.experiments.techniques import apply_technique


def test_schedules_and_warmup():
    assert [lr_factor("constant", warmup=4)(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    step = lr_factor("step", steps_per_epoch=10, step_size=2, gamma=0.1)
    assert step(0) == 1.0 and step(19) == 1.0 and step(20) == pytest.approx(0.1)
    assert lr_factor("exponential", steps_per_epoch=5, gamma=0.5)(10) == 0.25
    cosine = lr_factor("cosine", total=100)
    assert cosine(0) == 1.0 and cosine(50) == pytest.approx(0.5) and cosine(100) == pytest.approx(0.0)
    with pytest.raises(ExperimentError, match="choose one of"):
        lr_factor("linear")


def test_clip_and_penalty_by_glob():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model(torch.randn(3, 4)).pow(2).sum().mul(100).backward()
    before = clip(model, None)
    assert clip(model, 0.5) == pytest.approx(before)
    assert clip(model, None) == pytest.approx(0.5, rel=1e-4)
    only_head = penalty(model, l2=1.0, layers=["2"])
    assert only_head.item() == pytest.approx(model[2].weight.pow(2).sum().item())
    assert penalty(model, l1=1.0).item() == pytest.approx(model[0].weight.abs().sum().item() + model[2].weight.abs().sum().item())
    with pytest.raises(ExperimentError, match="match no layer"):
        penalty(model, l1=1.0, layers=["head*"])


def test_autocast_and_multi_head_loss():
    with autocast("bfloat16"):
        assert nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    with pytest.raises(ExperimentError, match="bfloat16"):
        autocast("float16", "cpu")
    y = torch.tensor([0, 1])
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    expected = 1.0 * nn.functional.cross_entropy(a, y) + 0.5 * nn.functional.cross_entropy(b, y)
    assert multi_head_loss((a, b), y, weights=(1.0, 0.5)).item() == pytest.approx(expected.item())
    with pytest.raises(ExperimentError, match="2 output heads"):
        multi_head_loss((a, b), y, weights=(1.0,))


def test_recipe_entries_fold_into_the_config():
    config = TrainConfig()
    for entry in ({"pass": "warmup", "steps": 10}, {"pass": "l2", "weight": 0.1, "layers": "head"},
                  {"pass": "schedule", "kind": "cosine"}, {"pass": "precision", "dtype": "bfloat16"}):
        config = apply_technique(config, entry)
    assert (config.warmup, config.l2, config.penalty_layers, config.schedule, config.precision) == (10, 0.1, ("head",), "cosine", "bfloat16")
    with pytest.raises(ExperimentError, match="unknown option"):
        apply_technique(config, {"pass": "warmup", "epochs": 3})
    with pytest.raises(ExperimentError, match="label smoothing"):
        apply_technique(config, {"pass": "label_smoothing", "eps": 2})


class TwoHeads(nn.Module):
    """A multi-head model: two classifiers on one body (wine)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(13, 16), nn.ReLU())
        self.a, self.b = nn.Linear(16, 3), nn.Linear(16, 3)

    def forward(self, x):
        h = self.body(x)
        return self.a(h), self.b(h)


def test_multi_head_bf16_experiment_runs():
    config = TrainConfig(epochs=1, batch_size=16, loss_weights=(1.0, 0.3), precision="bfloat16", warmup=3, clip_norm=1.0)
    result = experiment(TwoHeads, "wine", [("l2", [{"pass": "l2", "weight": 1e-3, "layers": ["a"]}])], seeds=1, config=config)
    assert result.runs["l2"][0]["history"]["val_acc"][0] > 0
