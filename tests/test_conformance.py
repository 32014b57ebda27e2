"""Conformance: every registered pass × every example model.

A new pass without an entry in ``PASS_CONFIGS`` fails here, so no pass ships untested.
Checks: graph lint, output shape, eval equivalence where the pass claims it, idempotence,
train-mode forward and backward, the save/load round trip, and the ONNX round trip
(both graphs exported and validated with ONNX Runtime).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx

import graphtricks as gt
from graphtricks.onnx import export_pair, validate_pair
from graphtricks.passes import PASSES
from graphtricks.io.folder import load, save
from tests.conftest import EXAMPLE_MODELS, example

# How each registered pass is configured for the conformance run.
PASS_CONFIGS = {
    "dropout": {"p": 0.2},
    "bn_to_ln": {},
    "init": {"scheme": "auto", "seed": 0},
    "residual": {"blocks": ["body.1", "extra", "features.4", "stages.*", "blocks.*", "fc1"]},
}


def test_every_registered_pass_has_a_conformance_config():
    missing = sorted(set(PASSES) - set(PASS_CONFIGS))
    assert not missing, f"add conformance configs for: {missing}"


def _make(name: str):
    return PASSES[name](**PASS_CONFIGS[name])


def _out(value):
    return value if isinstance(value, torch.Tensor) else value[0]


@pytest.mark.parametrize("pass_name", sorted(PASSES))
@pytest.mark.parametrize("spec", sorted(EXAMPLE_MODELS), ids=lambda s: s.split(":")[1])
def test_conformance(pass_name, spec, tmp_path):
    model, inputs = example(spec)
    reference = _out(model(*inputs))
    try:
        result = gt.rewrite(model, [_make(pass_name)], inputs)
    except gt.GraphtricksError as e:
        # A pass may refuse a model, but only with a clear error naming the place.
        pytest.skip(f"{pass_name} refuses {spec}: {e}")
    rewritten = result.model.eval()

    for region in result.tree.regions():
        if region.kind == "traced":
            region.graph_module.graph.lint()

    out = _out(rewritten(*inputs))
    assert out.shape == reference.shape
    if _make(pass_name).preserves_eval:
        assert torch.equal(out, reference), f"{pass_name} claims eval equivalence"

    again = gt.rewrite(rewritten, [_make(pass_name)], inputs)
    assert again.report.changes == [], f"{pass_name} is not idempotent: {again.report.changes[:3]}"

    trained = copy.deepcopy(rewritten).train()
    batch = tuple(torch.cat([t, t]) for t in inputs)  # batch > 1 for train-mode BatchNorm
    _out(trained(*batch)).float().pow(2).mean().backward()
    assert any(p.grad is not None for p in trained.parameters())

    folder = save(result, tmp_path / "out", {"spec": _abs(spec), "input_shapes": [list(s) for s in EXAMPLE_MODELS[spec]]})
    reloaded = load(folder).eval()
    assert torch.equal(_out(reloaded(*inputs)), out)
    assert set(reloaded.state_dict()) == set(rewritten.state_dict())
    if isinstance(rewritten, fx.GraphModule):
        assert isinstance(reloaded, fx.GraphModule)

    exported = export_pair(rewritten, inputs, folder)
    report = validate_pair(rewritten, inputs, folder, device="cpu", seeds=(0,))
    assert report.passed, report.summary()
    assert exported.train_path.is_file()


def _abs(spec: str) -> str:
    from tests.conftest import ROOT

    path, name = spec.split(":")
    return f"{ROOT / path}:{name}"
