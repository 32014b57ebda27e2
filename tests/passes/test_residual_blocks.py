"""Focused tests of graphtricks.passes.residual_blocks and graphtricks.passes.residual_graph."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from graphtricks.capturing import Region, capture
from graphtricks.capturing.shapes import propagate_shapes
from graphtricks.fxgraph.nodes import module_nodes, owner_path
from graphtricks.layers.residual import GATES, REGISTRY, PadShortcut, Residual, ResidualSpan, make_shortcut
from graphtricks.passes.residual_blocks import (
    BLOCK_RULE,
    Block,
    candidate_blocks,
    check_not_inplace,
    single_io,
    span_block,
    span_nodes,
    traced_block,
    wrapped_names,
)
from graphtricks.passes.residual_graph import add_merge_nodes, retarget


def by_name(gm):
    return {n.name: n for n in gm.graph.nodes}


def traced(model, *inputs):
    gm = fx.symbolic_trace(model)
    ShapeProp(gm).propagate(*inputs)
    return gm


class Net(nn.Module):
    def __init__(self, width=6):
        super().__init__()
        self.b = nn.Sequential(nn.Linear(4, width), nn.ReLU())
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        return self.head(self.b(x))


# -- traced_block ----------------------------------------------------------------------------
def test_traced_block_of_a_submodule():
    gm = traced(Net(), torch.randn(3, 4))
    block = traced_block(gm, "b", "model.b")
    assert isinstance(block, Block)
    assert block.where == "model.b" and block.local == "b"
    assert block.module is gm.b
    assert block.in_shape == (3, 4) and block.out_shape == (3, 6)
    assert block.dtypes == (torch.float32, torch.float32)
    assert {n.name for n in block.nodes} == {"b_0", "b_1"}
    leaf = traced_block(gm, "head", "head")
    assert leaf.in_shape == (3, 6) and leaf.out_shape == (3, 2) and leaf.module is gm.head


def test_traced_block_refusals():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    gm = traced(Shared(), torch.randn(2, 4))
    with pytest.raises(ValueError, match="does not run as a step"):
        traced_block(gm, "absent", "absent")
    with pytest.raises(ValueError, match="fc is called 2 times"):
        traced_block(gm, "fc", "fc")


def test_traced_block_in_place_first_step():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 4)))
    gm = traced(model, torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"^1 modifies its input in place"):
        traced_block(gm, "1", "1")
    # an in-place step that does not read the block's input is fine
    model2 = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True)))
    gm2 = traced(model2, torch.randn(2, 4))
    assert traced_block(gm2, "1", "1").out_shape == (2, 4)


def test_single_io_errors():
    class TwoIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, y):
            return self.fc(x) + y

    class TwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x)
            return h, torch.relu(h)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.two_in, self.two_out = TwoIn(), TwoOut()

        def forward(self, x):
            a, b = self.two_out(x)
            return self.two_in(a, b)

    gm = traced(M(), torch.randn(2, 4))
    with pytest.raises(ValueError, match=f"two_in takes 2 inputs; {BLOCK_RULE}"):
        single_io(module_nodes(gm.graph, "two_in"), "two_in")
    with pytest.raises(ValueError, match=f"two_out returns 2 values; {BLOCK_RULE}"):
        single_io(module_nodes(gm.graph, "two_out"), "two_out")
    # never shape-propagated: no recorded tensor
    bare = fx.symbolic_trace(Net())
    with pytest.raises(ValueError, match=r"has no recorded tensor input \(x\)"):
        single_io(module_nodes(bare.graph, "b"), "b")
    # a good one
    gm2 = traced(Net(), torch.randn(2, 4))
    n = by_name(gm2)
    assert single_io(module_nodes(gm2.graph, "b"), "b") == (n["x"], n["b_1"])


def test_check_not_inplace_forms():
    class M(nn.Module):
        def forward(self, x):
            y = x.relu_()
            return y * 2

    gm = traced(M(), torch.randn(2, 4))
    n = by_name(gm)
    with pytest.raises(ValueError, match=r"blk modifies its input in place \(.*relu_"):
        check_not_inplace(gm, [n["relu_"], n["mul"]], n["x"], "blk")
    # the same nodes seen from a later entry: relu_ does not write into mul's input
    check_not_inplace(gm, [n["mul"]], n["relu_"], "blk")


# -- spans ---------------------------------------------------------------------------------
class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.side = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        s = self.side(x)
        h = torch.relu(self.fc1(x))
        h = self.fc2(h)
        return self.fc3(h) + s


def test_span_nodes():
    gm = traced(Chain(), torch.randn(2, 4))
    assert [n.name for n in span_nodes(gm.graph, "fc1", "fc2", "fc1:fc2")] == ["fc1", "relu", "fc2"]
    with pytest.raises(ValueError, match="must run from an operation to a later one"):
        span_nodes(gm.graph, "fc2", "fc1", "fc2:fc1")
    with pytest.raises(ValueError, match="must run from an operation to a later one"):
        span_nodes(gm.graph, "x", "fc2", "x:fc2")
    with pytest.raises(ValueError, match="fc2 does not depend on side"):
        span_nodes(gm.graph, "side", "fc2", "side:fc2")


def test_span_block():
    gm = traced(Chain(), torch.randn(2, 4))
    regions = [Region("", "traced", gm)]
    region, block = span_block(regions, "fc1:fc2")
    assert region is regions[0]
    assert block.where == "fc1:fc2" and block.local == "fc1:fc2" and block.module is None
    assert block.in_shape == (2, 4) and block.out_shape == (2, 4)
    assert {n.name for n in block.nodes} == {"fc1", "relu", "fc2"}
    # a span whose middle value is read later
    with pytest.raises(ValueError, match="relu is used after the span; end the span there"):
        gm2 = traced(_Leaky(), torch.randn(2, 4))
        span_block([Region("", "traced", gm2)], "fc1:fc2")
    # names present in two regions need REGION/
    other = traced(Chain(), torch.randn(2, 4))
    two = [Region("", "traced", gm), Region("enc", "traced", other)]
    with pytest.raises(ValueError, match=r"several traced regions \(<root>, enc\)"):
        span_block(two, "fc1:fc2")
    region, block = span_block(two, "enc/fc1:fc2")
    assert region is two[1] and block.where == "enc/fc1:fc2"
    with pytest.raises(ValueError, match="no traced region"):
        span_block(two, "fc1:nothere")
    # already wrapped: None
    setattr(other, REGISTRY, {"residual_fc1_fc2": "span fc1:fc2"})
    assert span_block(two, "enc/fc1:fc2") is None


class _Leaky(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        self.fc2(h)  # a dead value: the span's last node is not what leaves it
        return h * 2


# -- candidates and wrapped names ------------------------------------------------------------
def test_candidate_blocks_of_a_sequential():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.Conv2d(16, 16, 1), nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    tree = capture(model, (x,))
    propagate_shapes(tree, (x,))
    found = {b["name"]: b for b in candidate_blocks(tree)}
    assert list(found) == ["0", "1", "2", "3", "4", "5"]
    assert found["0"]["shortcut"] == "pad" and found["0"]["output_shape"] == [2, 8, 8, 8]
    assert found["1"]["shortcut"] == "identity" and found["1"]["type"] == "ReLU"
    assert found["2"]["shortcut"] == "conv" and found["2"]["input_shape"] == [2, 8, 8, 8]
    assert found["3"]["shortcut"] == "identity"
    assert found["4"]["shortcut"] is None  # the rank changes
    assert found["5"]["shortcut"] == "conv" and found["5"]["type"] == "Linear"
    assert all(b["dtype"] == "float32" and b["wrapped"] is False for b in found.values())


def test_wrapped_names():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Residual(nn.Linear(4, 4))
            self.inner = nn.Module()
            self.inner.s = ResidualSpan(None, span="x:y")
            self.plain = nn.Linear(4, 4)

    model = M()
    setattr(model.inner, REGISTRY, {"blk": "block", "residual_p_q": "span p:q"})
    blocks, own = wrapped_names(model)
    assert blocks == {"a", "inner.blk"}
    assert own == {"inner.s", "inner.residual_p_q"}
    assert wrapped_names(nn.Sequential(nn.Linear(2, 2))) == (set(), set())


# -- residual_graph: add_merge_nodes does what Residual.merge does ---------------------------
SHORTCUTS = ["identity", "pad", "conv", "conv+bn"]


def _shortcut(kind, width):
    if kind == "identity":
        return None
    if kind == "pad":
        return PadShortcut(4, width)
    sc = make_shortcut("conv", (3, 4), (3, width), norm=kind == "conv+bn", seed_name="t")
    if kind == "conv+bn":
        bn = sc[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
        sc.eval()
    return sc


@pytest.mark.parametrize("post_act", ["none", "relu"])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("kind", SHORTCUTS)
def test_add_merge_nodes_matches_merge_for_a_wrapped_block(kind, gate, post_act):
    torch.manual_seed(0)
    width = 4 if kind == "identity" else 6
    model = Net(width).eval()
    x = torch.randn(3, 4)
    gm = traced(model, x)
    nodes = module_nodes(gm.graph, "b")
    entry, exit_ = single_io(nodes, "b")
    wrapper = Residual(gm.b, _shortcut(kind, width), gate=gate, post_act=post_act).eval()
    if gate != "none":
        wrapper.gate.data.fill_(0.75)  # a gate of 0 would hide a missing shortcut
    gm.add_submodule("b", wrapper)
    retarget(gm.graph, "b", "b.body", Residual)
    add_merge_nodes(gm, entry, exit_, set(nodes), "b", wrapper, {"b": ("b", Residual)})
    gm.graph.lint()
    gm.recompile()
    with torch.no_grad():
        ref = model.head(wrapper.merge(model.b(x), x))
        got = gm(x)
        plain = model(x)
    torch.testing.assert_close(got, ref)
    assert not torch.allclose(got, plain)  # the shortcut changed something
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    if kind == "conv+bn":  # one node per shortcut layer
        assert "b.shortcut.0" in targets and "b.shortcut.1" in targets
    elif kind == "identity":
        assert not any(str(t).startswith("b.shortcut") for t in targets)
    else:
        assert "b.shortcut" in targets
    assert any(n.op == "get_attr" and n.target == "b.gate" for n in gm.graph.nodes) is (gate != "none")
    add = next(n for n in gm.graph.nodes if n.target is operator.add)
    branch = add.args[0]
    if wrapper.gate is not None and getattr(wrapper, "gate_on", "shortcut") == "branch":
        assert branch.target is operator.mul and exit_ in branch.args  # α·F(x)
    else:
        assert branch is exit_
    assert add.meta["nn_module_stack"] == {"b": ("b", Residual)}
    assert add.meta["tensor_meta"] is exit_.meta["tensor_meta"]


@pytest.mark.parametrize("post_act", ["none", "relu"])
def test_add_merge_nodes_after_an_in_place_tail(post_act):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            y = self.fc(x)
            y.relu_()
            return self.out(y)

    torch.manual_seed(0)
    model = M().eval()
    x = torch.randn(5, 4)
    gm = traced(model, x)
    n = by_name(gm)
    nodes = span_nodes(gm.graph, "fc", "fc", "fc:fc") + [n["relu_"]]
    parts = ResidualSpan(None, span="fc:relu_", gate="zero", post_act=post_act)
    parts.gate.data.fill_(-2.0)
    gm.add_submodule("res", parts)
    add_merge_nodes(gm, n["x"], n["fc"], set(nodes), "res", parts, {"res": ("res", ResidualSpan)})
    gm.graph.lint()
    gm.recompile()
    with torch.no_grad():
        ref = model.out(parts(torch.relu(model.fc(x)), x))
        torch.testing.assert_close(gm(x), ref)


def test_add_merge_nodes_moves_the_model_output_mark():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).eval()
    x = torch.randn(2, 4)
    gm = traced(model, x)
    n = by_name(gm)
    n["_2"].meta["gt_model_output"] = True
    parts = ResidualSpan(None, span="_0:_2")
    gm.add_submodule("res", parts)
    inside = {n["_0"], n["_1"], n["_2"]}
    entry = next(m for m in gm.graph.nodes if m.op == "placeholder")
    add_merge_nodes(gm, entry, n["_2"], inside, "res", parts, {})
    gm.recompile()
    add = next(m for m in gm.graph.nodes if m.target is operator.add)
    assert add.meta.get("gt_model_output") is True and "gt_model_output" not in n["_2"].meta
    out = next(m for m in gm.graph.nodes if m.op == "output")
    assert out.args[0] is add
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x) + x)


def test_retarget():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return torch.relu(self.fc(x)) * self.w

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.b, self.bb = Inner(), Inner()

        def forward(self, x):
            return self.bb(self.b(x))

    torch.manual_seed(0)
    model = M()
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 4)
    ref = gm(x)
    n = by_name(gm)
    gm.add_submodule("b", Residual(gm.b))
    retarget(gm.graph, "b", "b.body", Residual)
    gm.recompile()
    assert n["b_fc"].target == "b.body.fc" and n["b_w"].target == "b.body.w"
    assert n["bb_fc"].target == "bb.fc" and n["bb_w"].target == "bb.w"  # a prefix of the name is not the module
    assert list(n["b_fc"].meta["nn_module_stack"].values()) == [
        ("b", Residual), ("b.body", Inner), ("b.body.fc", nn.Linear)]
    assert owner_path(n["relu"]) == "b.body"
    assert owner_path(n["relu_1"]) == "bb"
    assert list(n["bb_fc"].meta["nn_module_stack"].values())[0] == ("bb", Inner)
    torch.testing.assert_close(gm(x), ref)  # the moved nodes still find their parameters
