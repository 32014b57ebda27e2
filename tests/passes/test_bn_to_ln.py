"""BatchNorm → LayerNorm pass: forms and their statistics, carried parameters, functional and
opaque BatchNorm, timm BatchNormAct2d, training, ONNX export, idempotence, train == eval."""

from __future__ import annotations

import importlib
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from graphtricks.fxgraph.activations import ACTIVATION_MODULES
from graphtricks.errors import PassError
from graphtricks.layers import ChannelLayerNorm, NormAct, channel_layer_norm
from graphtricks.passes import InsertDropout, NoChangeWarning, pass_from_config
from graphtricks.functional import bn_to_ln
from graphtricks.passes.bn_to_ln import BatchNormToLayerNorm
from graphtricks.rewriting import rewrite


def _rand_affine(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial γ, β and running statistics (seeded)."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            c = m.num_features
            if m.affine:
                m.weight.data = torch.rand(c, generator=gen) + 0.5
                m.bias.data = torch.randn(c, generator=gen)
            m.running_mean.data = torch.randn(c, generator=gen)
            m.running_var.data = torch.rand(c, generator=gen) + 0.5
    return model


class Mixed(nn.Module):
    """BatchNorm on images, sequences and vectors."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn2d = nn.BatchNorm2d(8)
        self.conv1d = nn.Conv1d(8, 6, 3, padding=1)
        self.bn_seq = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 5)
        self.bn_vec = nn.BatchNorm1d(5)

    def forward(self, x):
        x = F.relu(self.bn2d(self.conv(x)))
        s = F.relu(self.bn_seq(self.conv1d(x.flatten(2))))
        return self.bn_vec(self.fc(s.mean(-1)))


class FrozenBN(nn.Module):
    """A functional batch norm with fixed statistics (traced: a ``batch_norm`` call node)."""

    def __init__(self, c: int):
        super().__init__()
        self.w = nn.Parameter(torch.rand(c) + 0.5)
        self.b = nn.Parameter(torch.randn(c))
        self.register_buffer("rm", torch.randn(c))
        self.register_buffer("rv", torch.rand(c) + 0.5)

    def forward(self, x):
        return F.batch_norm(x, self.rm, self.rv, self.w, self.b, False, 0.1, 1e-3)


class BatchStatsNorm(nn.Module):
    """``torch.batch_norm`` (aten argument order) on batch statistics only."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c))

    def forward(self, x):
        return torch.batch_norm(x, self.weight, self.bias, None, None, True, 0.1, 1e-5, False)


class TrainBranch(nn.Module):
    """Opaque (its forward reads self.training), with BatchNorm children, one in a ModuleList."""

    def __init__(self):
        super().__init__()
        BatchNormAct2d = pytest.importorskip("timm.layers").BatchNormAct2d

        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.bna = BatchNormAct2d(8, act_layer=nn.ReLU)
        self.heads = nn.ModuleList([nn.BatchNorm1d(8)])

    def forward(self, x):
        x = self.bna(self.bn(self.conv(x)))
        if self.training:
            x = x * 1.0
        return self.heads[0](x.mean((2, 3)))


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _no_bn(model: nn.Module) -> bool:
    return not any(isinstance(m, _BatchNorm) for m in model.modules())


def _changes(result) -> dict:
    return {c.where: c for c in result.report.changes}


# -- forms and their statistics ---------------------------------------------------------------
def test_channel_form_normalises_each_sample_and_position_over_c():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    result = bn_to_ln(model, (_x(4, 3, 9, 9),))
    assert type(result.model.get_submodule("1")) is ChannelLayerNorm
    y = result.model(_x(4, 3, 9, 9, seed=1))
    assert torch.allclose(y.mean(1), torch.zeros(()), atol=1e-5)
    assert torch.allclose(y.var(1, unbiased=False), torch.ones(()), atol=1e-3)
    # not the chw form: each channel's mean over the sample's positions is not zero
    assert y.mean((2, 3)).abs().max() > 0.05


def test_chw_form_normalises_each_sample_over_c_h_w():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    result = bn_to_ln(model, (_x(4, 3, 9, 9),), over="chw")
    norm = result.model.get_submodule("1")
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 1 and norm.num_channels == 8
    y = result.model(_x(4, 3, 9, 9, seed=1))
    assert torch.allclose(y.mean((1, 2, 3)), torch.zeros(()), atol=1e-5)
    assert torch.allclose(y.var((1, 2, 3), unbiased=False), torch.ones(()), atol=1e-3)
    assert y.mean(1).abs().max() > 0.05  # positions are not normalised on their own


def test_gamma_beta_eps_carried_running_stats_dropped():
    torch.manual_seed(0)
    model = _rand_affine(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8, eps=1e-3))).eval()
    gamma, beta = model[1].weight.detach().clone(), model[1].bias.detach().clone()
    result = bn_to_ln(model, (_x(2, 3, 5, 5),))
    norm = result.model.get_submodule("1")
    assert norm.eps == 1e-3
    assert torch.equal(norm.weight, gamma) and torch.equal(norm.bias, beta)
    keys = set(result.model.state_dict())
    assert not any(k.startswith("1.running") or k == "1.num_batches_tracked" for k in keys)
    change = _changes(result)["1"]
    assert change.copied_params == ["1.weight", "1.bias"] and change.new_params == []
    assert change.details["dropped"] == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    x = _x(2, 3, 5, 5, seed=2)
    h = model[0](x)  # the rewrite copied the model: same conv weights
    mean, var = h.mean(1, keepdim=True), h.var(1, unbiased=False, keepdim=True)
    expected = (h - mean) / torch.sqrt(var + 1e-3) * gamma[:, None, None] + beta[:, None, None]
    assert torch.allclose(result.model(x), expected, atol=1e-5)


def test_affine_false_gives_no_affine():
    layers = [nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False), nn.Flatten(), nn.BatchNorm1d(64, affine=False)]
    model = nn.Sequential(*layers)
    result = bn_to_ln(model.eval(), (_x(2, 3, 4, 4),), over="chw")
    m = result.model
    assert m.get_submodule("1").affine is False and m.get_submodule("3").elementwise_affine is False
    assert all(not n.startswith(("1.", "3.")) for n, _ in result.model.named_parameters())


def test_images_sequences_vectors_get_their_form():
    model = _rand_affine(Mixed()).eval()
    x = _x(4, 3, 6, 6)
    result = bn_to_ln(model, (x,))
    m = result.model
    assert type(m.bn2d) is ChannelLayerNorm and type(m.bn_seq) is ChannelLayerNorm
    assert type(m.bn_vec) is nn.LayerNorm and m.bn_vec.normalized_shape == (5,)
    assert _no_bn(m) and m(x).shape == model(x).shape
    shapes = {w: c.details["shape"] for w, c in _changes(result).items()}
    assert shapes == {"bn2d": [4, 8, 6, 6], "bn_seq": [4, 6, 36], "bn_vec": [4, 5]}
    chw = bn_to_ln(model, (x,), over="chw").model
    assert type(chw.bn2d) is nn.GroupNorm and type(chw.bn_seq) is nn.GroupNorm and type(chw.bn_vec) is nn.LayerNorm


def test_drift_is_relative_eval_output_change():
    model = _rand_affine(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))).eval()
    x = _x(4, 3, 5, 5)
    h = model[0](x)
    old = model[1](h)
    new = channel_layer_norm(h, model[1].weight, model[1].bias, model[1].eps)
    expected = float((new - old).norm() / old.norm())
    drift = bn_to_ln(model, (x,)).report.changes[0].details["drift"]
    assert drift == pytest.approx(expected, rel=1e-4) and drift > 0.01


# -- functional and opaque BatchNorm -----------------------------------------------------------
def test_functional_batch_norm_is_swapped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), FrozenBN(8)).eval()
    x = _x(2, 3, 5, 5)
    result = bn_to_ln(model, (x,))
    gm = result.model
    assert not any(n.target is F.batch_norm for n in gm.graph.nodes)
    assert any(n.target is F.layer_norm for n in gm.graph.nodes)
    assert "1.rm" not in gm.state_dict() and "1.rv" not in gm.state_dict()
    (change,) = result.report.changes
    assert change.copied_params == ["1.w", "1.b"] and change.details["drift"] > 0
    h = model[0](x)
    assert torch.allclose(gm(x), channel_layer_norm(h, model[1].w, model[1].b, 1e-3), atol=1e-5)
    chw = bn_to_ln(model, (x,), over="chw").model
    assert torch.allclose(chw(x), F.group_norm(h, 1, model[1].w, model[1].b, 1e-3), atol=1e-5)


def test_aten_batch_norm_on_sequences_is_swapped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 6, 1), BatchStatsNorm(6))
    x = _x(4, 3, 7)
    result = bn_to_ln(model, (x,), over="chw")
    assert not any(n.target is torch.batch_norm for n in result.model.graph.nodes)
    (change,) = result.report.changes
    assert change.copied_params == ["1.weight", "1.bias"] and change.details["shape"] == [4, 6, 7]
    expected = F.group_norm(model[0](x), 1, model[1].weight, model[1].bias, 1e-5)
    assert torch.allclose(result.model(x), expected, atol=1e-5)


def test_opaque_parent_children_swapped_and_act_reachable_by_later_passes():
    torch.manual_seed(0)
    model = TrainBranch().eval()
    result = rewrite(model, [BatchNormToLayerNorm(), InsertDropout(0.1)], (_x(4, 3, 6, 6),))
    m = result.model
    assert _no_bn(m)
    assert type(m.bn) is ChannelLayerNorm and type(m.heads[0]) is nn.LayerNorm
    assert isinstance(m.bna, NormAct) and isinstance(m.bna.act, nn.Module)
    wheres = {c.where for c in result.report.changes}
    assert {"bn", "bna", "heads.0"} <= wheres
    assert "bna.act" in wheres  # the dropout pass still found the activation kept inside NormAct


def test_unknown_subclass_skipped_with_note_and_plain_subclass_swapped():
    class Doubling(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    class Plain(nn.BatchNorm2d):
        pass

    model = nn.Sequential(Doubling(3), Plain(3)).eval()
    result = bn_to_ln(model, (_x(2, 3, 4, 4),))
    assert type(result.model.get_submodule("0")) is Doubling
    assert type(result.model.get_submodule("1")) is ChannelLayerNorm
    assert any("Doubling" in w and "0" in w for w in result.report.warnings)


def test_include_exclude_select_by_name():
    model = Mixed().eval()
    result = bn_to_ln(model, (_x(2, 3, 4, 4),), exclude=["bn_seq"])
    assert isinstance(result.model.bn_seq, nn.BatchNorm1d)
    assert {c.where for c in result.report.changes} == {"bn2d", "bn_vec"}
    only = bn_to_ln(model, (_x(2, 3, 4, 4),), include=["bn2*"])
    assert {c.where for c in only.report.changes} == {"bn2d"}


def test_bad_over_raises_and_config_round_trips():
    with pytest.raises(PassError, match="chw"):
        BatchNormToLayerNorm(over="hw")
    p = BatchNormToLayerNorm(over="chw", exclude=["head.*"])
    again = pass_from_config(p.config())
    assert isinstance(again, BatchNormToLayerNorm) and again.config() == p.config()


# -- behaviour of the swapped model ------------------------------------------------------------
def test_train_and_eval_outputs_identical_after_swap():
    model = _rand_affine(Mixed())
    x = _x(4, 3, 6, 6)
    assert not torch.allclose(model.train()(x), model.eval()(x))
    swapped = bn_to_ln(model, (x,)).model
    assert torch.equal(swapped.train()(x), swapped.eval()(x))


def test_idempotent():
    model = _rand_affine(Mixed()).eval()
    x = _x(4, 3, 6, 6)
    once = bn_to_ln(model, (x,)).model
    with pytest.warns(NoChangeWarning):
        twice = bn_to_ln(once, (x,))
    assert twice.report.changes == []
    assert torch.equal(twice.model(x), once(x))


def test_swapped_model_trains():
    torch.manual_seed(0)
    model = Mixed()
    x, target = _x(8, 3, 6, 6), torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(3))
    swapped = bn_to_ln(model, (x,)).model.train()
    opt = torch.optim.SGD(swapped.parameters(), lr=0.1)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(swapped(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("opset,dynamo", [(17, False), (18, True)])
def test_exports_to_onnx_with_layer_normalization(opset, dynamo):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    x = _x(2, 3, 6, 6)
    model = bn_to_ln(_rand_affine(Mixed()).eval(), (x,)).model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            proto = torch.onnx.export(model, (x,), opset_version=opset, dynamo=True, verbose=False).model_proto
        else:
            buf = io.BytesIO()
            torch.onnx.export(model, (x,), buf, opset_version=opset, dynamo=False)
            proto = onnx.load_from_string(buf.getvalue())
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("LayerNormalization") == 3 and "BatchNormalization" not in ops
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert torch.allclose(torch.from_numpy(y), model(x), atol=1e-4)


# -- timm efficientnet_b0 -------------------------------------------------------------------------
def _count_activation_calls(model: nn.Module, x: torch.Tensor) -> int:
    calls = []
    acts = [m for m in model.modules() if type(m) in ACTIVATION_MODULES]
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in acts]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return len(calls)


def test_efficientnet_b0_keeps_every_activation():
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False, drop_rate=0.0, drop_path_rate=0.0).eval()
    x = _x(2, 3, 64, 64)
    bn_acts = {n: type(m.act) for n, m in model.named_modules() if isinstance(m, BatchNormAct2d)}
    before = _count_activation_calls(model, x)
    result = bn_to_ln(model, (x,))
    m = result.model
    assert len(bn_acts) == 49 and len(result.report.changes) == 49
    assert _no_bn(m)
    for name, act_type in bn_acts.items():
        block = m.get_submodule(name)
        assert isinstance(block, NormAct) and type(block.norm) is ChannelLayerNorm and type(block.act) is act_type
    assert sum(t is nn.SiLU for t in bn_acts.values()) > 0
    assert _count_activation_calls(m, x) == before > 0
    drifts = [c.details["drift"] for c in result.report.changes]
    assert all(d is not None and math.isfinite(d) and d > 0 for d in drifts)
    assert torch.equal(m.train()(x), m.eval()(x))


class _SignBranch(nn.Module):
    """Opaque (data-dependent branch): its BatchNorm1d runs only on inputs with a positive mean."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.norm(x) if x.mean() > 0 else x


def test_batchnorm_that_did_not_run_gets_the_form_that_fits_every_layout():
    model = nn.Sequential(nn.Linear(3, 3), _SignBranch()).eval()
    with torch.no_grad():
        model[0].weight.copy_(-torch.eye(3))
        model[0].bias.zero_()
    x = torch.ones(4, 3)  # mean of the Linear's output < 0: the norm does not run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = rewrite(model, [BatchNormToLayerNorm()], (x,))
    norm = result.model.get_submodule("1.norm")
    assert isinstance(norm, ChannelLayerNorm)
    assert any("did not run" in w for w in result.report.warnings)
    for shape in ((4, 3), (4, 3, 5)):  # both layouts a BatchNorm1d takes
        y = torch.randn(shape)
        expected = F.layer_norm(y.transpose(1, -1), (3,), norm.weight, norm.bias, norm.eps).transpose(1, -1)
        assert torch.allclose(norm(y), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = rewrite(result.model, [BatchNormToLayerNorm()], (-x,))  # now the branch runs
    assert again.report.changes == []


def _drifts(result) -> dict:
    return {c.where: c.details["drift"] for c in result.report.changes if c.pass_name == "bn_to_ln"}


def test_drift_is_measured_again_when_a_reused_pass_saw_a_failed_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    reused = BatchNormToLayerNorm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception):  # the model rejects the inputs after the pass observed the forward
            rewrite(model, [InsertDropout(p=0.1), reused], (torch.randn(2, 5, 8, 8),))
        init = pass_from_config({"pass": "init", "seed": 3})
        later = rewrite(model, [init, reused], (x,))
        fresh = rewrite(model, [pass_from_config({"pass": "init", "seed": 3}), BatchNormToLayerNorm()], (x,))
    assert _drifts(later) == _drifts(fresh)


def test_drift_of_a_batchnorm_an_earlier_pass_added_is_measured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1)).eval()
    x = torch.randn(2, 3, 8, 8)
    residual = pass_from_config({"pass": "residual", "blocks": ["2"], "shortcut": "conv", "shortcut_norm": True,
                                 "gate": "zero"})
    assert residual.preserves_eval  # so bn_to_ln could have measured before the shortcut existed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = rewrite(model, [residual, BatchNormToLayerNorm()], (x,))
    drifts = _drifts(result)
    assert drifts and all(d is not None for d in drifts.values()), drifts


class _UnusedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
        self.aux = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))  # never called by forward

    def forward(self, x):
        return self.body(x)


def test_batchnorm_the_traced_graph_never_calls_is_named_in_a_note():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = rewrite(_UnusedHead().eval(), [BatchNormToLayerNorm()], (torch.randn(4, 3),))
    assert [c.where for c in result.report.changes] == ["body.1"]
    assert any("aux.1: never called" in w for w in result.report.warnings), result.report.warnings
    assert not any("body.1" in w for w in result.report.warnings)


@pytest.mark.parametrize("over", ["c", "chw"])
def test_drift_on_a_large_input_is_an_even_sample_and_says_so(over, monkeypatch):
    bn_module = importlib.import_module("graphtricks.passes.bn_to_ln")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32)).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(8, 3, 32, 32)  # the norm sees 262,144 values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampled = rewrite(model, [BatchNormToLayerNorm(over=over)], x).report.changes[0].details
        monkeypatch.setattr(bn_module, "DRIFT_SAMPLE", 1 << 40)
        exact = rewrite(model, [BatchNormToLayerNorm(over=over)], x).report.changes[0].details
    assert exact["drift_sampled"] == 1.0 and sampled["drift_sampled"] <= 0.125
    assert sampled["drift"] == pytest.approx(exact["drift"], rel=0.05)
