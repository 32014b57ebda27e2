"""The dropout pass: every activation form, its guarantees, and its refusals."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import graphtricks as gt
from graphtricks.errors import PassError
from graphtricks.passes.base import NoChangeWarning
from tests.conftest import example


def _dropouts(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d))}


class EveryForm(nn.Module):
    """One activation in each form fx records, each feeding a linear layer."""

    def __init__(self):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(32, 32) for _ in range(7))
        self.act = nn.GELU()
        self.inplace_act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.act(self.fcs[0](x))  # module
        x = F.silu(self.fcs[1](x))  # functional
        x = torch.tanh(self.fcs[2](x))  # torch namespace
        x = self.fcs[3](x).relu()  # method
        x = self.inplace_act(self.fcs[4](x))  # in-place module
        y = self.fcs[5](x)
        y.sigmoid_()  # in-place method whose result is unused: readers of y see it
        return self.fcs[6](y)


def test_every_form_gets_dropout_and_eval_is_bitwise_equal():
    torch.manual_seed(0)
    model, x = EveryForm().eval(), torch.randn(16, 32)
    result = gt.rewrite(model, [gt.InsertDropout(0.25)], (x,))
    assert [c.details["node"] for c in result.report.changes] == ["act", "silu", "tanh", "relu", "inplace_act", "sigmoid_"]
    assert len(_dropouts(result.model)) == 6
    assert torch.equal(result.model.eval()(x), model(x))


def test_inplace_activation_readers_see_the_dropped_tensor():
    model, x = EveryForm(), torch.randn(4, 32)
    gm = gt.rewrite(model, [gt.InsertDropout(0.25)], (x,)).model
    last = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "fcs.6")
    producer = last.args[0]
    assert producer.op == "call_module" and isinstance(gm.get_submodule(producer.target), nn.Dropout)


def test_train_mode_keep_rate_and_scaling():
    torch.manual_seed(0)
    model, x = EveryForm(), torch.randn(512, 32)
    p = 0.3
    rewritten = gt.rewrite(model, [gt.InsertDropout(p)], (x,)).model.train()
    seen = []
    for module in _dropouts(rewritten).values():
        module.register_forward_hook(lambda m, i, o: seen.append((i[0].detach(), o.detach())))
    rewritten(x)
    assert len(seen) == 6
    for inp, output in seen:
        live = inp != 0
        zeroed = (output[live] == 0).float().mean().item()
        n = live.sum().item()
        bound = 5 * (p * (1 - p) / n) ** 0.5
        assert abs(zeroed - p) < bound, (zeroed, p, bound)
        kept = output[live] != 0
        torch.testing.assert_close(output[live][kept], inp[live][kept] / (1 - p))


def test_channel_dropout_is_chosen_by_rank():
    model, (x,) = example("models/plain_cnn.py:PlainCNN")
    result = gt.rewrite(model, [gt.InsertDropout(0.1, kind="channel")], (x,))
    assert {type(m) for m in _dropouts(result.model).values()} == {nn.Dropout2d}
    mlp, (v,) = example("models/mlp.py:MLP")
    result = gt.rewrite(mlp, [gt.InsertDropout(0.1, kind="channel")], (v,))
    assert {type(m) for m in _dropouts(result.model).values()} == {nn.Dropout}


def test_no_dropout_after_a_model_output():
    model, (x,) = example("models/functional_acts.py:FunctionalActs")
    result = gt.rewrite(model, [gt.InsertDropout(0.1)], (x,))
    gm: fx.GraphModule = result.model
    output = next(n for n in gm.graph.nodes if n.op == "output")
    head = output.args[0]
    assert head.target is torch.sigmoid, "the sigmoid head must stay the model output"
    assert any("model output" in w for w in result.report.warnings)
    assert {c.details["node"] for c in result.report.changes} == {"relu", "tanh", "relu_", "leaky_relu", "sigmoid"}


def test_names_follow_the_activation():
    model, (x,) = example("models/plain_cnn.py:PlainCNN")
    result = gt.rewrite(model, [gt.InsertDropout(0.1)], (x,))
    assert sorted(_dropouts(result.model)) == ["features.2_dropout", "features.5_dropout", "features.8_dropout"]


def test_idempotent():
    model, (x,) = example("models/functional_acts.py:FunctionalActs")
    once = gt.rewrite(model, [gt.InsertDropout(0.1)], (x,))
    with pytest.warns(NoChangeWarning):
        twice = gt.rewrite(once.model, [gt.InsertDropout(0.1)], (x,))
    assert twice.report.changes == []
    assert len(_dropouts(twice.model)) == len(_dropouts(once.model))


def test_every_user_sees_the_dropped_tensor():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            h = torch.relu(x)
            return self.a(h) + self.b(h)

    gm = gt.rewrite(TwoUsers(), [gt.InsertDropout(0.5)], (torch.randn(2, 8),)).model
    relu = next(n for n in gm.graph.nodes if n.target is torch.relu)
    assert len(relu.users) == 1 and next(iter(relu.users)).op == "call_module"


def test_include_and_exclude_select_by_qualified_name():
    model, (x,) = example("models/plain_cnn.py:PlainCNN")
    only = gt.rewrite(model, [gt.InsertDropout(0.1, include=["features.5"])], (x,))
    assert [c.where for c in only.report.changes] == ["features.5"]
    without = gt.rewrite(model, [gt.InsertDropout(0.1, exclude=["features.[25]"])], (x,))
    assert [c.where for c in without.report.changes] == ["features.8"]
    by_type = gt.rewrite(model, [gt.InsertDropout(0.1, activations=["gelu"])], (x,))
    assert by_type.report.changes == []


def test_opaque_region_activation_is_wrapped_and_keys_kept():
    model, (x,) = example("models/encoder_block.py:TinyEncoder")
    result = gt.rewrite(model, [gt.InsertDropout(0.1)], (x,))
    assert [c.action for c in result.report.changes] == ["wrapped", "wrapped"]
    assert set(model.state_dict()) <= set(result.model.state_dict())
    assert torch.equal(result.model.eval()(x), model(x))
    assert [c.details["module"] for c in result.report.changes] == ["blocks.0.act_dropout", "blocks.1.act_dropout"]
    result.model.train()
    dropped = result.model.get_submodule("blocks.0.act_dropout")
    assert isinstance(dropped, nn.Dropout) and dropped.training
    assert type(result.model.get_submodule("blocks.0.act")) is nn.GELU  # the activation itself is unchanged


def test_placeholder_dropout_gets_the_requested_p():
    class WithPlaceholder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.drop = nn.Linear(8, 8), nn.GELU(), nn.Dropout(0.0)

        def forward(self, x):
            return self.drop(self.act(self.fc(x)))

    result = gt.rewrite(WithPlaceholder(), [gt.InsertDropout(0.2)], (torch.randn(2, 8),))
    assert [c.action for c in result.report.changes] == ["updated"]
    assert result.model.get_submodule("drop").p == 0.2


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, "0.1", True])
def test_bad_probability_is_an_error(p):
    with pytest.raises(PassError, match=r"\[0, 1\)"):
        gt.InsertDropout(p)


def test_zero_probability_warns_and_inserts_nothing():
    model, (x,) = example("models/plain_cnn.py:PlainCNN")
    with pytest.warns(NoChangeWarning, match="p = 0"):
        result = gt.rewrite(model, [gt.InsertDropout(0.0)], (x,))
    assert not _dropouts(result.model)


def test_functional_twin_matches_the_class():
    model, (x,) = example("models/plain_cnn.py:PlainCNN")
    a = gt.insert_dropout(model, (x,), p=0.1)
    b = gt.rewrite(model, [gt.InsertDropout(0.1)], (x,))
    assert [c.to_dict() for c in a.report.changes] == [c.to_dict() for c in b.report.changes]
