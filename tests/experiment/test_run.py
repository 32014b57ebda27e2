"""Experiments are reproducible, and their reports hold every figure they name."""

from __future__ import annotations

import json
import re
import time

from graphtricks.experiments import TrainConfig, experiment, load_data


def test_same_seeds_same_numbers(recipe):
    from tiny import WineMLP

    variants = [recipe("dropout", 'pass = "dropout"\np = 0.3'), recipe("smooth", 'pass = "label_smoothing"\neps = 0.1')]
    first = experiment(WineMLP, "wine", variants, seeds=[3, 4], config=TrainConfig(epochs=2, batch_size=16))
    again = experiment(WineMLP, "wine", variants, seeds=[3, 4], config=TrainConfig(epochs=2, batch_size=16))
    assert first.runs.keys() == again.runs.keys()
    for name in first.runs:
        for a, b in zip(first.runs[name], again.runs[name]):
            assert a["history"] == b["history"], name
    assert [p["after"] for p in first.panels] == [p["after"] for p in again.panels]
    other = experiment(WineMLP, "wine", variants[:1], seeds=[5], config=TrainConfig(epochs=2, batch_size=16))
    assert other.runs["original"][0]["history"] != first.runs["original"][0]["history"]


def test_one_panel_report_has_every_figure(tmp_path, recipe):
    """The CI panel: dropout on 300 digits, 2 seeds, 3 epochs — under 20 s of CPU."""
    from tiny import TinyMLP

    started = time.process_time()
    out = tmp_path / "run"
    result = experiment(TinyMLP, "digits", [recipe("dropout", 'pass = "dropout"\np = 0.5')], seeds=2,
                        config=TrainConfig(epochs=3, batch_size=16), train_size=300, label_noise=0.2, out=out)
    seconds = time.process_time() - started
    assert seconds < 20, seconds
    saved = json.loads((out / "results.json").read_text())
    html = (out / "report.html").read_text()
    assert saved["figures"] == [p["figure"] for p in result.panels] == ["curves-dropout.png"]
    for name in saved["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'data-figure="{name}"' in html
    assert set(re.findall(r'data-figure="([^"]+)"', html)) == set(saved["figures"])
    assert "src=\"http" not in html and "<script" not in html  # self-contained
    assert saved["panels"][0]["verdict"] in ("held", "not shown", "reversed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dropout.toml", "run"]  # no staging folder left


def test_panels_for_init_residual_bn_and_smoothing(tmp_path):
    from tiny import TinyBN

    result = experiment(TinyBN, "wine", [("ln", [{"pass": "bn_to_ln"}]), ("he", [{"pass": "init"}]),
                                         ("ls", [{"pass": "label_smoothing", "eps": 0.1}])],
                        seeds=2, config=TrainConfig(epochs=1, batch_size=16), batch_sizes=(4, 16), out=tmp_path / "r")
    kinds = {(p["variant"], p["kind"]) for p in result.panels}
    assert {("ln", "batch"), ("ln", "curves"), ("he", "signal"), ("he", "curves"), ("ls", "calibration")} <= kinds
    assert set(result.runs["original"][0]["batch"]) == {"4", "16"}
    html = (tmp_path / "r" / "report.html").read_text()
    for p in result.panels:
        assert (tmp_path / "r" / p["figure"]).is_file() and p["figure"] in html


def test_data_layouts_and_noise():
    data = load_data("digits", train_size=300, label_noise=0.2)
    assert data.x_train.shape == (300, 64) and data.layouts() == [(64,), (1, 8, 8)]
    assert load_data("breast-cancer").n_classes == 2
