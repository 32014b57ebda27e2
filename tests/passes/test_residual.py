"""The residual pass: shortcut choice, gate, gradients, errors, opaque parents, spans, PlainVGG."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import graphtricks as gt
from graphtricks.errors import PassError, SelectionError
from graphtricks.layers.residual import PadShortcut, Residual, ResidualSpan, choose_shortcut
from graphtricks.passes.base import pass_from_config
from graphtricks.functional import add_residual
from graphtricks.passes.residual import AddResidual, candidate_blocks
from models.plain_vgg import PlainVGG


def conv_bn_relu(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Net(nn.Module):
    """``head(block(x))``: one block to wrap, between two other layers."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.after = nn.Identity()

    def forward(self, x):
        return self.after(self.block(x))


class Opaque(nn.Module):
    """Untraceable (data-dependent branch) parent of a ModuleList of blocks and a Linear."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([conv_bn_relu(4, 4), conv_bn_relu(4, 8, stride=2)])
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        if x.mean() > -1e9:  # fx cannot trace this: the parent stays opaque
            x = x + 0
        return self.fc(x.mean(dim=(2, 3)))


class TwoExits(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a = self.conv1(x)
        return self.conv2(a) + a


def setup_function():
    torch.manual_seed(0)


def _rewrite(model, x, *blocks, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return add_residual(model.eval(), (x,), list(blocks), **kwargs)


# -- 1. the shortcut for each pair of shapes --------------------------------------------
CASES = [
    # block, input shape, shortcut option, chosen kind, stride, module type of S
    (lambda: nn.Conv2d(8, 8, 3, padding=1), (2, 8, 8, 8), "auto", "identity", (1, 1), nn.Identity),
    (lambda: nn.Conv2d(8, 16, 3, padding=1), (2, 8, 8, 8), "auto", "pad", (1, 1), PadShortcut),
    (lambda: nn.Conv2d(8, 16, 3, padding=1), (2, 8, 8, 8), "conv", "conv", (1, 1), nn.Conv2d),
    (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1), (2, 8, 8, 8), "auto", "conv", (2, 2), nn.Conv2d),
    (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1), (2, 8, 7, 7), "pad", "pad", (2, 2), PadShortcut),
    (lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1), (2, 8, 8, 8), "auto", "conv", (2, 2), nn.Conv2d),
    (lambda: nn.Conv1d(4, 8, 3, stride=2, padding=1), (2, 4, 10), "auto", "conv", (2,), nn.Conv1d),
    (lambda: nn.Linear(8, 16), (4, 8), "auto", "pad", (), PadShortcut),
    (lambda: nn.Linear(16, 8), (4, 16), "auto", "conv", (), nn.Linear),
]


def _expected_shortcut(kind, x, out_shape, stride, module):
    if kind == "identity":
        return x
    if kind == "pad":
        sub = x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)]
        pad = torch.zeros(out_shape[0], out_shape[1] - x.shape[1], *sub.shape[2:])
        return torch.cat([sub, pad], dim=1)
    if isinstance(module, nn.Linear):
        return x @ module.weight.T
    conv = {1: F.conv1d, 2: F.conv2d}[x.dim() - 2]
    return conv(x, module.weight, stride=stride)


@pytest.mark.parametrize("make, shape, option, kind, stride, cls", CASES)
def test_each_shortcut_kind_matches_its_shapes(make, shape, option, kind, stride, cls):
    block = make()
    x = torch.randn(shape)
    result = _rewrite(Net(block), x, "block", shortcut=option)
    wrapper = result.model.get_submodule("block")
    shortcut = wrapper.shortcut
    assert isinstance(wrapper, Residual) and type(shortcut) is cls
    (change,) = result.report.changes
    assert change.details["shortcut"] == kind and tuple(change.details["stride"]) == stride
    out = result.model(x)
    with torch.no_grad():
        f = block(x)
        expected = f + _expected_shortcut(kind, x, f.shape, stride, shortcut)
    assert out.shape == f.shape
    torch.testing.assert_close(out, expected)
    if kind == "conv":
        assert shortcut.bias is None and getattr(shortcut, "stride", stride) == stride
        assert change.new_params == ["block.shortcut.weight"]
    else:
        assert change.new_params == [] and not list(shortcut.parameters())


def test_choose_shortcut_rules():
    assert choose_shortcut("auto", (2, 8, 32, 32), (2, 8, 32, 32)) == ("identity", (1, 1))
    assert choose_shortcut("pad", (2, 8, 32, 32), (2, 8, 32, 32)) == ("identity", (1, 1))
    assert choose_shortcut("auto", (2, 8, 32, 32), (2, 32, 16, 16)) == ("conv", (2, 2))
    assert choose_shortcut("pad", (2, 8, 7, 7), (2, 16, 4, 4)) == ("pad", (2, 2))
    assert choose_shortcut("auto", (2, 8, 32, 16), (2, 8, 16, 16)) == ("conv", (2, 1))
    assert choose_shortcut("conv", (3, 5), (3, 5)) == ("conv", ())
    for args, why in [
        (("auto", (2, 8, 8, 8), (2, 8, 16, 16)), "upsampling"),
        (("pad", (2, 16, 8, 8), (2, 8, 8, 8)), "fewer channels"),
        (("auto", (2, 8, 8, 8), (2, 8, 5, 5)), "integer stride"),
        (("identity", (2, 8), (2, 16)), "shapes differ"),
        (("auto", (2, 8), (2, 8), torch.float32, torch.float64), "dtype"),
        (("auto", (2, 8, 4), (2, 8)), "rank"),
    ]:
        with pytest.raises(ValueError, match=why):
            choose_shortcut(*args)


def test_conv_shortcut_is_he_initialised_and_a_registered_parameter():
    x = torch.randn(2, 32, 16, 16)
    result = _rewrite(Net(nn.Conv2d(32, 128, 3, stride=2, padding=1)), x, "block", shortcut_norm=True)
    (change,) = result.report.changes
    assert change.new_params == ["block.shortcut.0.weight", "block.shortcut.1.weight", "block.shortcut.1.bias"]
    params = dict(result.model.named_parameters())
    assert set(change.new_params) <= set(params)
    weight = params["block.shortcut.0.weight"]
    assert weight.shape == (128, 32, 1, 1)
    assert abs(weight.std().item() - (2 / 128) ** 0.5) < 0.1 * (2 / 128) ** 0.5  # He, fan_out = 128
    assert isinstance(result.model.get_submodule("block.shortcut.1"), nn.BatchNorm2d)
    again = _rewrite(Net(nn.Conv2d(32, 128, 3, stride=2, padding=1)), x, "block", shortcut_norm=True)
    assert torch.equal(again.model.get_parameter("block.shortcut.0.weight"), weight)  # seeded by the block's name


# -- 2. gate, post-activation, gradients --------------------------------------------------
def test_zero_gate_keeps_eval_output_exactly():
    model, x = PlainVGG().eval(), torch.randn(2, 3, 32, 32)
    result = _rewrite(model, x, "stages.*", gate="zero", shortcut_norm=True)
    assert len(result.report.changes) == 3
    assert AddResidual(gate="zero").preserves_eval and not AddResidual().preserves_eval
    with torch.no_grad():
        assert torch.equal(result.model.eval()(x), model(x))
    assert [c.new_params[0] for c in result.report.changes] == ["stages.0.gate", "stages.1.gate", "stages.2.gate"]


def test_post_act_relu_applies_after_the_sum():
    block, x = nn.Conv2d(4, 4, 3, padding=1), torch.randn(2, 4, 6, 6)
    out = _rewrite(Net(block), x, "block", post_act="relu").model(x)
    with torch.no_grad():
        torch.testing.assert_close(out, torch.relu(block(x) + x))


def test_gradient_reaches_body_shortcut_and_gate():
    x = torch.randn(4, 3, 32, 32)
    expect = {"none": ["stages.1.body.0.weight", "stages.1.shortcut.weight"],
              "zero": ["stages.1.gate", "stages.1.body.0.weight"]}
    for gate, names in expect.items():
        model = _rewrite(PlainVGG(), x, "stages.*", gate=gate).model.train()
        model(x).pow(2).mean().backward()
        params = dict(model.named_parameters())
        for name in names:
            assert params[name].grad is not None and params[name].grad.abs().sum() > 0, (gate, name)


# -- 3. errors: one line, naming the block and both shapes; nothing changed ---------------
class TwoInputs(nn.Module):
    def forward(self, x, y):
        return x * y


class TwoOutputs(nn.Module):
    def forward(self, x):
        return torch.relu(x), x * 2


class UsesBoth(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        if isinstance(self.block, TwoInputs):
            return self.block(x, x + 1)
        a, b = self.block(x)
        return a + b


ERRORS = [
    (Net(nn.Upsample(scale_factor=2)), (2, 8, 4, 4), "block", {}, r"input 2x8x4x4 float32 → output 2x8x8x8 .*upsampl"),
    (Net(nn.Conv2d(16, 8, 1)), (2, 16, 4, 4), "block", {"shortcut": "pad"}, r"2x16x4x4 .* 2x8x4x4 .*fewer channels"),
    (Net(nn.AdaptiveAvgPool2d(5)), (2, 8, 8, 8), "block", {}, r"8 → 5: not a division by an integer stride"),
    (Net(nn.Conv2d(8, 16, 1)), (2, 8, 4, 4), "block", {"shortcut": "identity"}, r"shapes differ"),
    (UsesBoth(TwoInputs()), (2, 4), "block", {}, r"block takes 2 inputs"),
    (UsesBoth(TwoOutputs()), (2, 4), "block", {}, r"block returns 2 values"),
    (Net(nn.ReLU(inplace=True)), (2, 4), "block", {}, r"modifies its input in place"),
    (UsesBoth(TwoInputs()), (2, 4), "unused", {}, r"unused does not run"),
    (PlainVGG(), (2, 3, 32, 32), "stages.**", {}, r"blocks stages.0 and stages.0.0 are nested"),
]


@pytest.mark.parametrize("model, shape, block, kwargs, message", ERRORS)
def test_impossible_blocks_raise_one_line_errors(model, shape, block, kwargs, message):
    with pytest.raises(PassError, match=message) as info:
        _rewrite(model, torch.randn(shape), block, **kwargs)
    assert "\n" not in str(info.value)


def test_dtype_change_is_refused():
    class ToDouble(nn.Module):
        def forward(self, x):
            return x.double()

    with pytest.raises(PassError, match="dtype changes"):
        _rewrite(Net(ToDouble()), torch.randn(2, 4), "block")


def test_all_blocks_are_validated_before_any_edit():
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Upsample(scale_factor=2))
    keys = list(model.state_dict())
    with pytest.raises(PassError, match=r"^residual: no auto shortcut fits 1: "):
        _rewrite(model, torch.randn(2, 4, 4, 4), "0", "1", inplace=True)
    assert list(model.state_dict()) == keys and not any(isinstance(m, Residual) for m in model.modules())


def test_unmatched_pattern_is_refused_and_options_are_checked():
    with pytest.raises(SelectionError, match=r"blocks pattern 'layer\?\.0' matches nothing"):
        _rewrite(PlainVGG(), torch.randn(2, 3, 32, 32), "stages.1", "layer?.0")
    result = _rewrite(PlainVGG(), torch.randn(2, 3, 32, 32), "stages.1", "layer?.0", strict=False)
    assert any("'layer?.0' matches nothing" in w for w in result.report.warnings)
    assert [c.where for c in result.report.changes] == ["stages.1"]
    bad = [{"shortcut": "conv1x1"}, {"gate": "one"}, {"post_act": "gelu"}, {"spans": ["a-b"]},
           {"shortcut": "pad", "shortcut_norm": True}]
    for kwargs in bad:
        with pytest.raises(PassError):
            AddResidual(["x"], **kwargs)
    p = AddResidual("stages.*", spans=["a:b"], shortcut="pad", gate="zero", exclude=["stages.0"])
    assert pass_from_config(p.config()).config() == p.config()


# -- 4. traced, leaf, opaque children, spans; idempotence ----------------------------------
def test_state_dict_keys_gain_body_and_old_checkpoints_load():
    model, x = PlainVGG().eval(), torch.randn(2, 3, 32, 32)
    result = _rewrite(model, x, "stages.*", gate="zero")
    keys = set(result.model.state_dict())
    assert "stages.1.body.0.weight" in keys and "stages.1.0.weight" not in keys
    assert result.report.changes[1].details["keys"] == "stages.1.* -> stages.1.body.*"
    fresh = copy.deepcopy(result.model)
    for p in fresh.parameters():
        p.data.zero_()
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    assert unexpected == []
    new = {"stages.0.gate", "stages.1.gate", "stages.1.shortcut.weight", "stages.2.gate", "stages.2.shortcut.weight"}
    assert set(missing) == new
    assert torch.equal(fresh.get_parameter("stages.2.body.3.weight"), model.get_parameter("stages.2.3.weight"))


def test_children_of_an_opaque_module_are_wrapped():
    model, x = Opaque().eval(), torch.randn(2, 4, 8, 8)
    result = _rewrite(model, x, "blocks.*", "fc", gate="zero")
    assert {c.where for c in result.report.changes} == {"blocks.0", "blocks.1", "fc"}
    assert isinstance(result.model.blocks[1], Residual) and isinstance(result.model.blocks[1].shortcut, nn.Conv2d)
    assert "blocks.1.body.0.weight" in result.model.state_dict()
    paths = {r.path: r.kind for r in result.tree.regions()}
    assert paths["blocks.1"] == "opaque" and "blocks.1.body" in paths
    with torch.no_grad():
        assert torch.equal(result.model(x), model(x))
        result.model.blocks[1].gate.fill_(1.0)
        inner = model.blocks[0](x)
        expected = model.blocks[1](inner) + result.model.blocks[1].shortcut(inner)
        assert torch.allclose(result.model.blocks[1](inner), expected)


@pytest.mark.parametrize(
    "make, shape, blocks", [(PlainVGG, (2, 3, 32, 32), "stages.*"), (Opaque, (2, 4, 8, 8), "blocks.*")], ids=["traced", "opaque"]
)
def test_wrapping_is_idempotent(make, shape, blocks):
    x = torch.randn(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twice = gt.rewrite(make().eval(), [AddResidual(blocks), AddResidual(blocks)], x)
        assert len(twice.report.changes) == 2 + (make is PlainVGG)  # the second pass found them wrapped
        model = twice.model
        for _ in range(2):  # re-captured, and re-captured from a deep copy (what rewrite does)
            again = gt.rewrite(model, [AddResidual(blocks)], x)
            assert again.report.changes == []
            assert any("already has a residual shortcut" in w for w in again.report.warnings)
            model = again.model


def test_parameter_free_and_mode_dependent_blocks_in_a_trace():
    class Halve(nn.Module):  # inlined by the trace: no module of its own is left in the graph module
        def forward(self, x):
            return x * 0.5

    class Noisy(nn.Module):  # reads self.training: kept opaque, a leaf of its parent's trace
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            return self.fc(x) + (torch.randn_like(x) if self.training else 0)

    x = torch.randn(3, 6)
    model = nn.Sequential(nn.Linear(6, 6), Halve(), Noisy()).eval()
    result = _rewrite(model, x, "1", "2", gate="zero")
    assert {r.path: r.kind for r in result.tree.regions()} == {"": "traced", "2.body": "opaque"}
    assert "2.body.fc.weight" in result.model.state_dict()
    with torch.no_grad():
        assert torch.equal(result.model(x), model(x))
        result.model.get_parameter("1.gate").fill_(1.0)
        hidden = model[0](x)
        torch.testing.assert_close(result.model(x), model[2](hidden * 0.5 + hidden))


def test_span_of_a_flat_sequential():
    layers = [*conv_bn_relu(3, 8), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()]
    model = nn.Sequential(*layers).eval()  # flat: node names _0 … _5
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = gt.rewrite(model, [AddResidual(spans=["_3:_4"])], x)
        (change,) = result.report.changes
        assert change.where == "_3:_4" and change.new_params == ["residual__3__4.shortcut.weight"]
        parts = result.model.get_submodule("residual__3__4")
        assert isinstance(parts, ResidualSpan)
        with torch.no_grad():
            inner = model[:3](x)
            expected = model[5](model[3:5](inner) + parts.shortcut(inner))
            torch.testing.assert_close(result.model(x), expected)
        again = gt.rewrite(result.model, [AddResidual(spans=["_3:_4"])], x)
        assert again.report.changes == []
    with pytest.raises(PassError, match="modifies its input in place"):
        model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(inplace=True), nn.Conv2d(3, 3, 1))
        gt.rewrite(model, [AddResidual(spans=["_1:_2"])], x)
    with pytest.raises(PassError, match="returns 2 values"):
        gt.rewrite(TwoExits(), [AddResidual(spans=["conv1:conv2"])], torch.randn(2, 4, 3, 3))
    with pytest.raises(PassError, match="no traced region"):
        gt.rewrite(TwoExits(), [AddResidual(spans=["nope:conv2"])], torch.randn(2, 4, 3, 3))


def test_pass_runs_on_a_bare_graph_module():
    block = nn.Conv2d(4, 8, 1)
    gm = fx.symbolic_trace(Net(block))
    x = torch.randn(2, 4, 5, 5)
    ShapeProp(gm).propagate(x)
    p = AddResidual("block")
    assert p(gm).modified
    with torch.no_grad():
        torch.testing.assert_close(gm(x), block(x) + F.pad(x, (0, 0, 0, 0, 0, 4)))


def test_candidate_blocks_lists_sequential_children_with_shapes():
    x = torch.randn(2, 3, 32, 32)
    tree = gt.rewrite(PlainVGG().eval(), [], x).tree
    blocks = {b["name"]: b for b in candidate_blocks(tree)}
    stage = blocks["stages.1"]
    assert (stage["input_shape"], stage["output_shape"]) == ([2, 32, 32, 32], [2, 64, 16, 16])
    assert (blocks["stages.0"]["shortcut"], stage["shortcut"], stage["type"]) == ("identity", "conv", "Sequential")
    assert "stages.0.2" not in blocks  # ReLU(inplace=True) modifies its input: no residual block
    assert "stages.1.0" in blocks and "stem" not in blocks  # children of Sequentials only
    opaque = gt.rewrite(Opaque().eval(), [], torch.randn(2, 4, 8, 8))
    names = {b["name"] for b in candidate_blocks(opaque.tree, opaque.example_inputs)}
    assert {"blocks.1.0", "blocks.1.2"} <= names


# -- 5. PlainVGG: trains and exports -------------------------------------------------------
@pytest.mark.parametrize("options", [{"shortcut_norm": True, "post_act": "relu"}, {"shortcut": "pad", "gate": "zero"}])
def test_plain_vgg_with_residual_stages_trains_and_exports(options, tmp_path):
    import onnxruntime as ort

    assert sum(p.numel() for p in PlainVGG().parameters()) < 1_000_000
    x, target = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    model = _rewrite(PlainVGG(), x, "stages.*", **options).model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses

    model.eval()
    path = tmp_path / "vgg_residual.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"], opset_version=17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_zero_branch_gate_starts_each_block_as_its_shortcut_and_trains_its_branch():
    body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model = nn.Sequential(nn.Linear(8, 8), body, nn.Linear(8, 2))
    x = torch.randn(4, 8)
    for gate, starts_as in (("zero-branch", lambda m, h: h), ("zero", lambda m, h: m[1](h))):
        result = gt.rewrite(model, [AddResidual(["1"], gate=gate)], (x,))
        rm = result.model
        h = model[0](x)
        # zero-branch: H = 0·F(h) + h; zero: H = F(h) + 0·h (the original block)
        torch.testing.assert_close(rm(x), model[2](starts_as(model, h)))
        gate_param = next(p for n, p in rm.named_parameters() if n.endswith("gate"))
        rm(x).sum().backward()
        assert gate_param.grad is not None and gate_param.grad.abs() > 0


def test_zero_branch_gate_in_a_traced_span_matches_the_wrapper():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model, x = Net(), torch.randn(3, 6)
    result = gt.rewrite(model, [AddResidual(spans=["a:b"], gate="zero-branch")], (x,))
    torch.testing.assert_close(result.model(x), x)  # α = 0: the span starts as the identity shortcut
    with torch.no_grad():
        next(p for n, p in result.model.named_parameters() if n.endswith("gate")).fill_(1.0)
    torch.testing.assert_close(result.model(x), model(x) + x)
