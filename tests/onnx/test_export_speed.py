"""What makes the torch.export path's pair cheaper than two exports: one translation table per
process, and onnxscript's optimisation without its quadratic rewrite rule."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from graphtricks.onnx import export_pair
from graphtricks.onnx.optimise import _linear_rules, optimise

registration = pytest.importorskip("torch.onnx._internal.exporter._registration")


class Halves(nn.Module):
    """Slices its input into two halves (onnxscript's SlicesSplit fuses such a pair of four-input
    Slices into a Split; torch's exporter writes five-input ones)."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(x[:, :4]) * self.right(x[:, 4:8])


def _builds(monkeypatch) -> list[int]:
    """Counts torch's translation-table builds (``ONNXRegistry.from_torchlib``)."""
    built: list[int] = []
    original = registration.ONNXRegistry.from_torchlib.__func__

    def counted(cls, *args, **kwargs):
        built.append(1)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(registration.ONNXRegistry, "from_torchlib", classmethod(counted))
    return built


def test_one_translation_table_serves_every_graph_of_every_export(tmp_path, monkeypatch):
    from graphtricks.onnx.dynamo import _translation_table

    _translation_table.cache_clear()
    built = _builds(monkeypatch)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))
    result = export_pair(model, (torch.randn(2, 8),), tmp_path / "a", mc_dropout=True)
    assert result.exporter == "dynamo" and result.mc_path is not None
    export_pair(model, (torch.randn(2, 8),), tmp_path / "b", opset=18)
    assert len(built) == 1  # five graphs, one table
    export_pair(model, (torch.randn(2, 8),), tmp_path / "c", opset=19)
    assert len(built) == 2  # one per opset


def test_the_linear_rules_are_onnxscripts_defaults_less_the_multi_output_pattern():
    import onnxscript.rewriter as rewriter

    rules = _linear_rules()
    left_out = [r for r in rewriter._DEFAULT_REWRITE_RULES if r not in rules]
    assert rules and left_out  # onnxscript 0.5: SlicesSplit, the one rule with two output nodes
    assert all(not r._matcher.pattern.has_single_output_node for r in left_out)
    assert all(r._matcher.pattern.has_single_output_node for r in rules)


def _translated(model: nn.Module, x: torch.Tensor):
    program = torch.export.export(model, (x,), strict=False)
    return torch.onnx.export(program, (x,), dynamo=True, optimize=False, verbose=False).model


def _both(model: nn.Module, x: torch.Tensor):
    import onnxscript.optimizer

    ours, theirs = _translated(model, x), _translated(model, x)
    optimise(ours)
    onnxscript.optimizer.optimize_ir(theirs)
    return ours, theirs


@pytest.mark.parametrize("build, shape", [
    (Halves, (2, 8)),  # two Slice of one tensor: what the rule left out would fuse, were they its kind
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)),
     (1, 3, 8, 8)),
], ids=["slices", "conv-bn"])
def test_optimise_writes_onnxscripts_graph(build, shape):
    import onnx_ir as ir

    torch.manual_seed(0)
    model, x = build().eval(), torch.randn(*shape)
    ours, theirs = _both(model, x)
    assert [n.op_type for n in ours.graph] == [n.op_type for n in theirs.graph]
    assert sorted(ours.graph.initializers) == sorted(theirs.graph.initializers)
    session = ort.InferenceSession(ir.serde.serialize_model(ours).SerializeToString())
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_the_pair_exports_and_validates_with_its_slices(tmp_path):
    from graphtricks.onnx import validate_pair

    torch.manual_seed(0)
    model, x = nn.Sequential(Halves(), nn.Dropout(0.3)).eval(), torch.randn(2, 8)
    result = export_pair(model, (x,), tmp_path)
    assert result.exporter == "dynamo"
    assert "Slice" in [n.op_type for n in onnx.load(str(result.train_path)).graph.node]
    assert validate_pair(model, (x,), tmp_path, device="cpu").passed
