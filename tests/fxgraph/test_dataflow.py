"""Focused tests of graphtricks.fxgraph.dataflow: consumer_map, merge_reach, residual_norms, last_norm."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphtricks.fxgraph.dataflow import consumer_map, data_nodes, last_norm, merge_reach, residual_norms
from graphtricks.layers.residual import Residual


def by_name(gm):
    return {n.name: n for n in gm.graph.nodes}


def act_of(reach, node):
    """(name, where) of the activation a node reaches, or None."""
    act = reach[node][0]
    return None if act is None else (act[1], act[3])


class LeafTracer(fx.Tracer):
    """Keeps instances of ``leaves`` as opaque call_module nodes."""

    def __init__(self, *leaves):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m, qualname):
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def trace_with_leaves(model, *leaves):
    return fx.GraphModule(model, LeafTracer(*leaves).trace(model))


# -- consumer_map ------------------------------------------------------------------------------
def test_conv_reaches_relu_through_norm_and_pool():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(4, 4, 1))
    gm = fx.symbolic_trace(model)
    n = by_name(gm)
    reach = consumer_map(gm)
    assert act_of(reach, n["_0"]) == ("ReLU", "3")
    assert act_of(reach, n["_1"]) == ("ReLU", "3")
    assert reach[n["_0"]][1] is None and reach[n["_0"]][2] is False
    # the last conv is a model output and reaches no nonlinearity
    assert reach[n["_4"]] == (None, None, True)


def test_linear_reaches_through_reshapes_and_dropout():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            h = self.fc(x).view(2, 4, 2).flatten(1)
            return F.gelu(self.drop(torch.flatten(h, 1)) * 0.5)

    gm = fx.symbolic_trace(M())
    reach = consumer_map(gm)
    assert act_of(reach, by_name(gm)["fc"]) == ("GELU", "gelu")


def test_another_layer_stops_the_walk():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Tanh())
    gm = fx.symbolic_trace(model)
    n = by_name(gm)
    reach = consumer_map(gm)
    assert reach[n["_0"]] == (None, None, False)  # a linear consumer: no activation, no output
    assert act_of(reach, n["_1"]) == ("Tanh", "2")


def test_residual_add_carries_both_operands():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.pre = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            x = self.pre(x)
            return F.silu(self.bn(self.conv(x)) + x)

    gm = fx.symbolic_trace(M())
    n = by_name(gm)
    reach = consumer_map(gm)
    assert act_of(reach, n["conv"]) == ("SiLU", "silu")
    assert act_of(reach, n["pre"]) == ("SiLU", "silu")  # the shortcut operand of the add


def test_earliest_activation_wins_and_kwargs_are_kept():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.leaky = nn.LeakyReLU(0.2)

        def forward(self, x):
            h = self.fc(x)
            a = self.leaky(h)
            b = torch.tanh(h)
            return a + b

    gm = fx.symbolic_trace(M())
    reach = consumer_map(gm)
    act = reach[by_name(gm)["fc"]][0]
    assert act[1] == "LeakyReLU"  # leaky comes first in graph order
    assert act[2] == {"negative_slope": 0.2}
    assert act[3] == "leaky"


def test_shape_reads_are_ignored_and_data_scaling_stops():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.g = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x)
            n = h.size(0)
            y = torch.relu(h.view(n, -1))
            z = torch.sigmoid(self.g(x) * x)  # scaled by data, not a constant: a linear consumer
            return y + z

    gm = fx.symbolic_trace(M())
    n = by_name(gm)
    reach = consumer_map(gm)
    assert act_of(reach, n["fc"]) == ("ReLU", "relu")
    assert reach[n["g"]][0] is None


def test_method_activation_and_method_reshape():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x).reshape(2, 2, 2).permute(0, 2, 1).sigmoid()

    gm = fx.symbolic_trace(M())
    assert act_of(consumer_map(gm), by_name(gm)["fc"]) == ("Sigmoid", "sigmoid")


def test_inner_region_output_is_unknown_unless_marked():
    model = nn.Sequential(nn.Linear(4, 4))
    gm = fx.symbolic_trace(model)
    fc = by_name(gm)["_0"]
    assert consumer_map(gm)[fc] == (None, None, True)
    reach = consumer_map(gm, prefix="enc")
    assert reach[fc] == (None, "leaves region enc into opaque code", False)
    fc.meta["gt_model_output"] = True
    assert consumer_map(gm, prefix="enc")[fc] == (None, None, True)
    # activations are named model-level under a prefix
    gm2 = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    assert act_of(consumer_map(gm2, prefix="enc"), by_name(gm2)["_0"]) == ("ReLU", "enc.1")


class Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x))


class DropPathLike(nn.Module):
    def forward(self, x):
        return x * 1.0


class BNAct(nn.BatchNorm1d):
    def __init__(self, n):
        super().__init__(n)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(super().forward(x))


def test_opaque_modules_by_type():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
            self.opaque = Opaque()
            self.dp = DropPathLike()
            self.bnact = BNAct(4)

        def forward(self, x):
            return self.opaque(self.a(x)) + torch.tanh(self.dp(self.b(x))) + self.bnact(self.c(x))

    gm = trace_with_leaves(M(), Opaque, DropPathLike, BNAct)
    n = by_name(gm)
    reach = consumer_map(gm, prefix="m")
    assert reach[n["a"]][0] is None
    assert reach[n["a"]][1] == "feeds opaque Opaque at m.opaque"
    assert act_of(reach, n["b"]) == ("Tanh", "m.tanh")  # parameter-free, childless: passes through
    assert act_of(reach, n["c"]) == ("GELU", "m.bnact.act")  # a norm with a fused activation


def test_merge_reach():
    assert merge_reach([]) == (None, None, False)
    early, late = (1, "ReLU", {}, "r"), (5, "Tanh", {}, "t")
    got = merge_reach([(late, None, False), (None, "why 1", False), (early, "why 2", True), (None, None, False)])
    assert got == (early, "why 1", True)
    assert merge_reach([(late, None, False)]) == (late, None, False)


# -- residual_norms ------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + x)


def test_residual_norms_basic_block():
    model = BasicBlock()
    gm = fx.symbolic_trace(model)
    assert residual_norms(gm) == [(gm.bn2, None, "add")]
    assert gm.bn2 is model.bn2


def test_residual_norms_through_layer_scale_and_dropout():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
            self.ln = nn.LayerNorm(8)
            self.gamma = nn.Parameter(torch.ones(8))
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            h = self.ln(self.fc2(F.gelu(self.fc1(x))))
            return x + self.drop(h * self.gamma)  # the branch is the second operand

    gm = fx.symbolic_trace(M())
    assert residual_norms(gm) == [(gm.ln, None, "add")]


def test_residual_norms_functional_norm():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.ln = nn.LayerNorm(8)

        def forward(self, x):
            h = torch.relu(self.fc(x))
            return F.layer_norm(h, (8,), self.ln.weight, self.ln.bias) + x

    gm = fx.symbolic_trace(M())
    assert residual_norms(gm) == [(gm.ln, None, "add")]


@pytest.mark.parametrize("case", ["no_act", "act_after_norm", "act_on_shortcut", "no_shared_input", "no_norm"])
def test_residual_norms_rejects_non_residual_adds(case):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x, y):
            if case == "no_act":
                return self.bn(self.fc(x)) + x
            if case == "act_after_norm":
                return torch.relu(self.bn(self.fc(x))) + x
            if case == "act_on_shortcut":
                return self.bn(torch.relu(self.fc(x))) + torch.relu(x)
            if case == "no_shared_input":
                return self.bn(torch.relu(self.fc(x))) + y
            return self.fc2(torch.relu(self.fc(x))) + x

    gm = fx.symbolic_trace(M())
    assert residual_norms(gm) == []


def test_residual_norms_of_a_wrapped_block():
    body = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.LayerNorm(4))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.blk = Residual(body)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.blk(x))

    gm = fx.symbolic_trace(M())
    found = residual_norms(gm)
    assert len(found) == 1
    norm, wrapper, where = found[0]
    assert norm is body[3]
    assert wrapper is gm.blk and where == "blk"


# -- last_norm -------------------------------------------------------------------------------
def test_last_norm_of_modules():
    bn = nn.BatchNorm2d(4)
    assert last_norm(nn.Sequential(nn.Conv2d(4, 4, 1), bn)) is bn
    assert last_norm(nn.Sequential(nn.Conv2d(4, 4, 1), bn, nn.Dropout(), nn.Identity())) is bn
    assert last_norm(nn.Sequential(nn.Conv2d(4, 4, 1), bn, nn.ReLU())) is None
    assert last_norm(nn.Sequential(nn.Conv2d(4, 4, 1))) is None
    assert last_norm(bn) is bn
    assert last_norm(nn.Linear(2, 2)) is None


def test_last_norm_of_a_graph_body():
    ln = nn.LayerNorm(4)
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), ln, nn.Dropout()))
    assert last_norm(gm) is ln
    gm2 = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), ln, nn.ReLU()))
    assert last_norm(gm2) is None


class _Mixed(nn.Module):
    """Values from the input, from a parameter only, from a buffer only and from the input's shape."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(4))
        self.register_buffer("table", torch.ones(4))

    def forward(self, x, y):
        gate = torch.sigmoid(self.alpha)
        bias = torch.relu(self.table * 2)
        pos = torch.tanh(torch.arange(x.size(1), dtype=torch.float32))
        return torch.relu(x) * gate + bias + pos + y


def test_data_nodes_follow_the_inputs_only():
    gm = fx.symbolic_trace(_Mixed())
    names = {n.name for n in data_nodes(gm)}
    assert {"x", "y", "relu", "output"} <= names
    assert not names & {"sigmoid", "relu_1", "tanh", "size", "arange", "alpha", "table"}
    only_y = {n.name for n in data_nodes(gm, {"y"})}  # x is no data in this region's callers
    assert "relu" not in only_y and "y" in only_y and "output" in only_y
