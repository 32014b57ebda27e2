"""Issue 23: dropout in opaque modules follows the rules of traced ones; dropout only on data;
a placeholder dropout gets p; when nothing changes, the report says why, activation by activation."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

import graphtricks as gt
from graphtricks.cli import app
from graphtricks.layers.caller_dropout import ActivationThenDropout, caller_dropout_of
from graphtricks.onnx import export_pair
from graphtricks.onnx.portable import portable_dropouts
from graphtricks.onnx.graph import dropout_infos

HERE = Path(__file__)
X = torch.randn(64, 8)


class SharedAct(nn.Module):
    """Opaque (reads the mode): one ReLU object for the hidden layer and for the output."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(8, 8), nn.Linear(8, 8), nn.ReLU()

    def forward(self, x):
        if self.training:
            x = x * 1.0
        return self.act(self.fc2(self.act(self.fc1(x))))


class Holder(nn.Module):
    """A traced root around an opaque block."""

    def __init__(self):
        super().__init__()
        self.block = SharedAct()

    def forward(self, x):
        return self.block(x)


def _rewrite(model, p=0.5, x=X, **kwargs):
    return gt.rewrite(model.eval(), [gt.InsertDropout(p, **kwargs)], (x,))


def _dropouts(model):
    return [m for m in model.modules() if isinstance(m, nn.Dropout)]


# -- opaque modules: dropout at the caller ----------------------------------------------------
def test_shared_opaque_activation_gets_no_dropout_after_the_model_output():
    torch.manual_seed(0)
    result = _rewrite(Holder())
    (change,) = result.report.changes
    assert change.action == "wrapped" and change.details["calls"] == [0]
    assert any("(call 2 of 2): ReLU output is a model output" in w for w in result.report.warnings)
    block = result.model.block.train()
    dropped = []
    block.act_dropout.register_forward_hook(lambda m, i, o: dropped.append(o))
    y = result.model(X)
    assert len(dropped) == 1  # the hidden call only
    assert torch.equal(y, torch.relu(block.fc2(dropped[0])))  # the output is the activation's, undropped


def test_an_opaque_root_is_handled_like_an_opaque_child():
    result = _rewrite(SharedAct())
    assert [(c.where, c.details["calls"]) for c in result.report.changes] == [("act", [0])]


def test_hooks_and_direct_calls_see_the_activation_alone():
    torch.manual_seed(0)
    model = _rewrite(Holder()).model.train()
    seen = []
    model.block.act.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    out = model(X)
    assert len(seen) == 2 and all(torch.equal(o, torch.relu(i)) for i, o in seen)
    assert (out == 0).float().mean() < 0.9  # the forward ran with dropout in between, not all zeros
    assert type(model.block.act) is nn.ReLU and torch.equal(model.block.act(X), torch.relu(X))
    assert not any(isinstance(m, ActivationThenDropout) for m in model.modules())  # views only during forward


def test_the_caller_reads_the_activations_attributes_through_the_view():
    class ReadsAct(SharedAct):
        def forward(self, x):
            if self.training:
                x = x * 1.0
            assert self.act.inplace is False  # the caller reads its activation's settings
            return self.fc2(self.act(self.fc1(x)))

    model = _rewrite(nn.Sequential(ReadsAct(), nn.ReLU())).model.train()
    assert model(X).shape == X.shape


def test_the_view_is_removed_when_the_forward_raises():
    model = _rewrite(Holder()).model.train()
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5))
    assert type(model.block.act) is nn.ReLU


def test_eval_is_bitwise_equal_and_train_drops_at_the_hidden_call():
    model = Holder().eval()
    rewritten = _rewrite(model).model
    assert torch.equal(rewritten.eval()(X), model(X))
    rewritten.train()
    torch.manual_seed(3)
    a = rewritten(X)
    rewritten.block.act_dropout.p = 0.0
    assert not torch.equal(a, rewritten(X))  # p = 0.5 changed the train output


def test_mc_dropout_in_an_eval_model_still_drops_at_the_caller():
    model = _rewrite(Holder()).model.eval()
    model.block.act_dropout.train()  # MC dropout: the dropouts on, everything else in eval mode
    ran = []
    model.block.act_dropout.register_forward_hook(lambda m, i, o: ran.append(m))
    model(X)
    assert len(ran) == 1


def test_copies_and_pickles_keep_the_caller_dropout():
    rewritten = _rewrite(Holder()).model.train()
    buffer = io.BytesIO()
    torch.save(rewritten, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(rewritten), torch.load(buffer, weights_only=False)):
        assert caller_dropout_of(other.block) is not None
        torch.manual_seed(1)
        want = rewritten(X)
        torch.manual_seed(1)
        assert torch.equal(other.train()(X), want)
        assert caller_dropout_of(other.block) is not caller_dropout_of(rewritten.block)


def test_save_load_replays_the_caller_dropout(tmp_path):
    result = _rewrite(Holder())
    folder = gt.save(result, tmp_path / "out", {"spec": f"{HERE}:Holder", "input_shapes": [list(X.shape)]})
    loaded = gt.load(folder).train()
    assert caller_dropout_of(loaded.block).sites == caller_dropout_of(result.model.block).sites
    torch.manual_seed(2)
    want = result.model.train()(X)
    torch.manual_seed(2)
    assert torch.equal(loaded(X), want)


def test_onnx_train_graph_has_the_dropout_and_the_infer_graph_none(tmp_path):
    model = _rewrite(Holder()).model
    written = export_pair(model, (X[:4],), tmp_path)
    assert len(portable_dropouts(onnx.load(written.train_path))) == 1
    infer = onnx.load(written.infer_path)
    assert not portable_dropouts(infer) and not dropout_infos(infer)


def test_rewriting_twice_changes_nothing_and_says_why():
    once = _rewrite(Holder())
    twice = gt.rewrite(once.model, [gt.InsertDropout(0.5)], (X,))
    assert twice.report.changes == [] and len(_dropouts(twice.model)) == 1
    assert any("block.act" in w and "already followed by block.act_dropout" in w for w in twice.report.warnings)


class NormAct(nn.BatchNorm1d):
    """timm's BatchNormAct2d in small: a BatchNorm subclass that reads the mode, with an activation
    module of another library (timm's GELU)."""

    def __init__(self, n):
        layers = pytest.importorskip("timm.layers")  # a skip where the `zoo` extra is not installed

        super().__init__(n)
        self.act = layers.get_act_layer("gelu")()

    def forward(self, x):
        if self.training:
            x = x + 0.0
        return self.act(super().forward(x))


def test_a_zoo_activation_inside_a_mode_reading_norm_gets_dropout():
    model = nn.Sequential(nn.Linear(8, 8), NormAct(8), nn.Linear(8, 2))
    assert type(model[1].act).__module__.startswith("timm")
    result = _rewrite(model)
    assert [(c.where, c.action) for c in result.report.changes] == [("1.act", "wrapped")]


# -- placeholders --------------------------------------------------------------------------
class FunctionalPlaceholder(nn.Module):
    """Hugging Face's pattern: F.dropout(p=self.activation_dropout) right after the activation."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(8, 16), nn.Linear(16, 8), nn.GELU()
        self.dropout, self.activation_dropout = 0.0, 0.0

    def forward(self, x, **kwargs):  # **kwargs: not traceable, as in Hugging Face layers
        h = F.dropout(self.act(self.fc1(x)), p=self.activation_dropout, training=self.training)
        return F.dropout(self.fc2(h), p=self.dropout, training=self.training) + x


def test_functional_placeholder_gets_p_through_the_attribute_it_reads():
    model = nn.Sequential(FunctionalPlaceholder(), nn.Linear(8, 2))
    result = _rewrite(model, p=0.2)
    (change,) = result.report.changes
    assert change.action == "updated" and change.details["attribute"] == "0.activation_dropout"
    layer = result.model[0]
    assert layer.activation_dropout == 0.2 and layer.dropout == 0.0  # only the one it reads
    assert not _dropouts(result.model)


def test_module_placeholder_in_opaque_code_gets_p():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.drop = nn.Linear(8, 8), nn.SiLU(), nn.Dropout(0.0)

        def forward(self, x):
            if self.training:
                x = x + 0.0
            return self.drop(self.act(self.fc(x)))

    model = nn.Sequential(Block(), nn.Linear(8, 2))
    result = _rewrite(model, p=0.3)
    assert [(c.action, c.details["module"]) for c in result.report.changes] == [("updated", "0.drop")]
    assert result.model[0].drop.p == 0.3


class RealDropoutAfter(nn.Module):
    """T5's pattern: the activation is followed by a dropout with p > 0 (traced and opaque)."""

    def __init__(self):
        super().__init__()
        self.fc, self.act, self.drop, self.head = nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.drop(self.act(self.fc(x))))


def test_activation_already_followed_by_dropout_is_named_site_by_site():
    model = nn.Sequential(RealDropoutAfter(), nn.ReLU(), nn.Dropout(0.2), nn.Linear(2, 2))
    result = _rewrite(model)
    assert result.report.changes == []
    assert result.report.skipped == {"dropout": {"followed_by_dropout": 2}}
    notes = [w for w in result.report.warnings if "already followed by" in w]
    assert any(w.startswith("dropout: 0.act: ReLU already followed by Dropout(p=0.1)") for w in notes)
    assert any(w.startswith("dropout: 1: ReLU already followed by Dropout(p=0.2)") for w in notes)
    assert "changed nothing" in result.report.warnings[-1] and "followed by dropout" in result.report.warnings[-1]


# -- dropout only on data ------------------------------------------------------------------
class LearntGate(nn.Module):
    """efficientvim's pattern: sigmoid of a parameter, viewed, scaling the data."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(8))
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.fc(x)) * torch.sigmoid(self.alpha).view(1, -1) + torch.tanh(self.alpha)


class PositionBias(nn.Module):
    """swin v2's pattern: an MLP on a coordinates buffer, inside a mode-reading (opaque) module."""

    def __init__(self):
        super().__init__()
        self.register_buffer("coords", torch.linspace(-1, 1, 8).view(8, 1))
        self.cpb = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        bias = self.cpb(self.coords).view(1, 8)
        return self.fc(x) + bias if self.training else self.fc(x) + bias


def test_input_independent_activations_are_skipped_and_counted():
    model = nn.Sequential(LearntGate(), PositionBias(), nn.Linear(8, 2))
    result = _rewrite(model)
    assert [c.where for c in result.report.changes] == ["0.relu"]
    # tanh(alpha) and the coordinates MLP's ReLU are no data; sigmoid(alpha) is one too (and a gate)
    assert result.report.skipped == {"dropout": {"input_independent": 3}}
    with_constants = _rewrite(model, constants=True)
    assert sorted(c.where for c in with_constants.report.changes) == ["0.relu", "0.tanh", "1.cpb.1"]
    assert with_constants.report.skipped == {"dropout": {"gates": 1}}  # sigmoid(alpha).view(...) * x
    assert gt.InsertDropout(0.1, constants=True).config()["constants"] is True


def test_a_gate_behind_a_view_is_a_gate():
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x) * torch.sigmoid(x.mean(1)).view(-1, 1)

    result = _rewrite(nn.Sequential(SE(), nn.Linear(8, 2)))
    assert result.report.changes == [] and result.report.skipped == {"dropout": {"gates": 1}}


def test_activations_of_opaque_code_itself_are_counted_and_named_when_nothing_changes():
    class Own(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent control flow: not traceable
                x = -x
            return F.gelu(self.fc(x))

    result = _rewrite(nn.Sequential(Own(), nn.Linear(8, 2)))
    assert result.report.skipped == {"dropout": {"in_opaque_code": 1}}
    assert any(w == "dropout: 0: GELU computed by opaque code itself; no dropout can follow it" for w in result.report.warnings)


def test_cli_dropout_constants_flag(tmp_path):
    runner = CliRunner()
    base = ["rewrite", f"{HERE}:LearntGate", "--input-shape", "4,8", "--dropout", "0.1", "--dry-run", "--json"]
    default = json.loads(runner.invoke(app, base).stdout)
    assert default["report"]["skipped"] == {"dropout": {"input_independent": 2}}
    assert default["report"]["changes_by_pass"] == {"dropout": 1}
    both = json.loads(runner.invoke(app, [*base, "--dropout-constants", "--dropout-gates"]).stdout)
    assert both["report"]["changes_by_pass"] == {"dropout": 3}
    summary = runner.invoke(app, base[:-1], terminal_width=200).output
    assert "--dropout-constants includes them" in summary


def test_dropout_at_the_caller_survives_a_later_batchnorm_swap():
    layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(nn.Conv2d(3, 8, 3), layers.BatchNormAct2d(8, act_layer=nn.ReLU), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(2, 3, 12, 12)
    result = gt.rewrite(model, [gt.InsertDropout(0.5), gt.BatchNormToLayerNorm()], (x,))
    rewritten = result.model.train()
    ran = []
    rewritten[1].act_dropout.register_forward_hook(lambda m, i, o: ran.append(m))
    rewritten(x)
    assert len(ran) == 1 and type(rewritten[1]).__name__ == "NormAct"


class ListedActs(nn.Module):
    """Opaque (branches on data), its activations held in a ModuleList and a ModuleDict."""

    def __init__(self):
        super().__init__()
        self.lins = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.acts = nn.ModuleList([nn.ReLU(), nn.GELU()])
        self.by_name = nn.ModuleDict({"last": nn.SiLU()})

    def forward(self, x):
        if x.sum() > 0:
            x = x + 1
        for lin, act in zip(self.lins, self.acts):
            x = act(lin(x))
        return self.lins[2](self.by_name["last"](x))


class ListedHolder(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = ListedActs()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.block(x))


def test_activations_an_opaque_module_holds_in_containers_get_dropout_at_the_caller(tmp_path):
    model = ListedHolder().eval()
    result = _rewrite(model)
    rewritten = result.model
    where = sorted(c.where for c in result.report.changes)
    assert where == ["block.acts.0", "block.acts.1", "block.by_name.last"]
    assert type(rewritten.block.acts[0]) is nn.ReLU and type(rewritten.block.by_name["last"]) is nn.SiLU
    assert torch.equal(rewritten.eval()(X), model(X))
    rewritten.train()
    ran = []
    for name in ("acts_0_dropout", "acts_1_dropout", "by_name_last_dropout"):
        getattr(rewritten.block, name).register_forward_hook(lambda m, i, o: ran.append(m))
    rewritten(X)
    assert len(ran) == 3
    assert type(rewritten.block.acts[1]) is nn.GELU  # the views are gone after the forward
    loaded = copy.deepcopy(rewritten)
    torch.manual_seed(4)
    want = rewritten(X)
    torch.manual_seed(4)
    assert torch.equal(loaded(X), want)
    written = export_pair(rewritten, (X[:4],), tmp_path)
    assert len(portable_dropouts(onnx.load(written.train_path))) == 3


class CalledDict(nn.ModuleDict):
    """A ModuleDict with a forward of its own (as torchvision's IntermediateLayerGetter). Capture
    looks into it as into any ModuleDict (it is no region), so its activations are its holder's."""

    def forward(self, x):
        for module in self.values():
            x = module(x)
        return x


class HoldsCalledDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = CalledDict({"lin": nn.Linear(8, 8), "act": nn.ReLU()})
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        if x.sum() > 0:  # opaque
            x = x + 1
        return self.head(self.body(x))


def test_a_called_container_s_activation_gets_one_dropout_at_its_holder():
    model = HoldsCalledDict().eval()
    result = _rewrite(nn.Sequential(model))
    assert [c.where for c in result.report.changes] == ["0.body.act"]
    assert [r.path for r in result.tree.regions()] == ["", "0"]  # body is no region: no second dropout
    rewritten = result.model.train()
    ran = []
    rewritten[0].body_act_dropout.register_forward_hook(lambda m, i, o: ran.append(m))
    rewritten(X)
    assert len(ran) == 1  # applied where body calls its ReLU, inside the holder's forward
