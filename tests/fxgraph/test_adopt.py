"""A module takes a graph as itself; an edited graph is compiled when next called, not per edit."""

from __future__ import annotations

import inspect
import warnings
from collections import Counter

import torch
from torch import fx, nn

import graphtricks as gt
from graphtricks.fxgraph.adopt import adopt_graph, compile_when_called, is_adopted


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, scale: float = 2.0):
        return torch.relu(self.fc(x)) * scale


def test_a_graph_adopted_uncompiled_compiles_at_its_first_call_and_after_each_edit():
    module = _Scaled()
    reference = _Scaled()
    reference.load_state_dict(module.state_dict())
    adopt_graph(module, fx.Tracer().trace(module), compile=False)
    assert is_adopted(module) and "_code" not in module.__dict__, "nothing generated yet"
    assert list(inspect.signature(module.forward).parameters) == ["x", "scale"]
    x = torch.randn(3, 4)
    assert torch.equal(module(x), reference(x)) and "_code" in module.__dict__
    relu = next(n for n in module.graph.nodes if n.target is torch.relu)
    with module.graph.inserting_after(relu):
        neg = module.graph.call_function(torch.neg, (relu,))
    relu.replace_all_uses_with(neg)
    neg.args = (relu,)
    compile_when_called(module)
    compile_when_called(module)  # a second edit before any call: still waiting
    assert "_code" not in module.__dict__
    assert "neg" in module.code  # reading the code generates it
    assert torch.equal(module(x, 3.0), -torch.relu(reference.fc(x)) * 3.0)


def test_a_rewrite_never_compiles_a_flat_graph_it_folds(monkeypatch):
    model = nn.Sequential(_Scaled(), _Scaled()).eval()
    x = torch.randn(2, 4)
    compiled: Counter = Counter()
    real = fx.GraphModule.recompile

    def counted(self):
        compiled[id(self)] += 1
        return real(self)

    monkeypatch.setattr(fx.GraphModule, "recompile", counted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = gt.rewrite(model, [gt.InsertDropout(p=0.1), gt.BatchNormToLayerNorm()], x)
    root = result.model
    # The root's own code is unedited here (its children carry the edits): it runs its own forward.
    assert compiled[id(root)] == 0 and not isinstance(root, fx.GraphModule), "the flat graph is never compiled"
    assert all(n == 1 for n in compiled.values())
    with torch.no_grad():
        assert torch.equal(root.eval()(x), model(x))
