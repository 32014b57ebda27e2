"""Focused tests of graphtricks.fxgraph.nodes and graphtricks.fxgraph.kinds."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from graphtricks.fxgraph import kinds
from graphtricks.fxgraph.nodes import (
    ancestors,
    boundary,
    feeds_model_output,
    find_submodule,
    insert_module_after,
    is_dropout,
    module_nodes,
    mutates_input,
    name_glob,
    node_where,
    nodes_between,
    owner_path,
    unique_attr_name,
)
from graphtricks.layers.norm import ChannelLayerNorm


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(x)) + x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = Block()
        self.head = nn.Sequential(nn.Linear(4, 3), nn.Tanh())

    def forward(self, x):
        return self.head(torch.flatten(self.b(x), 1))


class Diamond(nn.Module):
    """x → l1 → relu → l2 ─┐
       x → l3 ─────────────┴ add"""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        a = self.l1(x)
        s = self.l3(x)
        b = torch.relu(a)
        c = self.l2(b)
        return c + s


def by_name(gm):
    return {n.name: n for n in gm.graph.nodes}


@pytest.fixture
def net():
    torch.manual_seed(0)
    return fx.symbolic_trace(Net())


# -- names and ownership -------------------------------------------------------------------
def test_owner_path_leaf_call_is_owned_by_its_caller(net):
    n = by_name(net)
    assert owner_path(n["b_fc"]) == "b"
    assert owner_path(n["b_act"]) == "b"
    assert owner_path(n["add"]) == "b"  # inlined code of Block
    assert owner_path(n["head_0"]) == "head"
    assert owner_path(n["flatten"]) == ""  # root's own code
    assert owner_path(n["x"]) == ""


def test_node_where(net):
    n = by_name(net)
    assert node_where("", n["b_fc"]) == "b.fc"  # module calls: the module path
    assert node_where("m", n["b_fc"]) == "m.b.fc"
    assert node_where("", n["add"]) == "b.add"  # owner.node
    assert node_where("m", n["add"]) == "m.b.add"
    assert node_where("", n["flatten"]) == "flatten"
    assert node_where("m", n["flatten"]) == "m.flatten"


def test_unique_attr_name(net):
    assert unique_attr_name(net, "", "fresh") == "fresh"
    assert unique_attr_name(net, "", "b") == "b_1"
    net.add_submodule("b_1", nn.Identity())
    assert unique_attr_name(net, "", "b") == "b_2"
    assert unique_attr_name(net, "b", "fc") == "b.fc_1"
    assert unique_attr_name(net, "b", "other") == "b.other"
    # plain attributes and class attributes (methods) are taken too
    net.b.flag = 3
    assert unique_attr_name(net, "b", "flag") == "b.flag_1"
    assert unique_attr_name(net, "", "forward") == "forward_1"
    # a missing parent takes the base name
    assert unique_attr_name(net, "nowhere", "x") == "nowhere.x"


def test_find_submodule(net):
    assert find_submodule(net, "b.fc") is net.b.fc
    assert find_submodule(net, "head.1") is getattr(net.head, "1")
    assert find_submodule(net, "nope") is None
    assert find_submodule(net, "b.fc.deeper") is None


@pytest.mark.parametrize(
    "pattern,name,hit",
    [
        ("stages.*", "stages.1", True),
        ("stages.*", "stages.1.0", False),
        ("stages.**", "stages.1.0", True),
        ("**.fc", "b.fc", True),
        ("**.fc", "a.b.c.fc", True),
        ("**.fc", "b.fcx", False),
        ("a?c", "abc", True),
        ("a?c", "a.c", False),
        ("a.b", "axb", False),  # a literal dot
        ("[ab]x", "ax", True),
        ("[ab]x", "cx", False),
        ("[!ab]x", "cx", True),
        ("[!ab]x", "ax", False),
        ("layer*.conv1", "layer1.conv1", True),
        ("layer*.conv1", "layer1.0.conv1", False),
    ],
)
def test_name_glob(pattern, name, hit):
    assert bool(name_glob(pattern).fullmatch(name)) is hit


# -- module stacks and dataflow ------------------------------------------------------------
def test_module_nodes(net):
    names = lambda path: [n.name for n in module_nodes(net.graph, path)]  # noqa: E731
    assert names("b") == ["b_fc", "b_act", "add"]
    assert names("b.fc") == ["b_fc"]
    assert names("head") == ["head_0", "head_1"]
    assert names("absent") == []


def test_boundary_of_a_block(net):
    n = by_name(net)
    entries, exits = boundary(module_nodes(net.graph, "b"))
    assert entries == [n["x"]]
    assert exits == [n["add"]]
    # a prefix of the block: x is read, and both fc's (by nothing outside) and act's value leave
    entries, exits = boundary([n["b_fc"], n["b_act"]])
    assert entries == [n["x"]] and exits == [n["b_act"]]


def test_boundary_ignores_parameters_and_lists_every_exit():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x):
            a = x * self.w
            b = a + 1
            return a, b.sum()

    gm = fx.symbolic_trace(M())
    n = by_name(gm)
    entries, exits = boundary([n["w"], n["mul"], n["add"]])
    assert entries == [n["x"]]  # the get_attr parameter is no entry
    assert exits == [n["mul"], n["add"]]  # mul goes to the output, add to sum


def test_nodes_between():
    gm = fx.symbolic_trace(Diamond())
    n = by_name(gm)
    names = lambda nodes: [x.name for x in nodes]  # noqa: E731
    assert names(nodes_between(gm.graph, n["l1"], n["l2"])) == ["l1", "relu", "l2"]
    # from relu on: l3 comes earlier and l1 too, so neither is in
    assert names(nodes_between(gm.graph, n["relu"], n["add"])) == ["relu", "l2", "add"]
    # l3 is no dependency of l2: first is then not among them
    assert names(nodes_between(gm.graph, n["l3"], n["l2"])) == ["relu", "l2"]
    # placeholders are never included
    assert n["x"] not in nodes_between(gm.graph, n["x"], n["add"])


def test_ancestors():
    gm = fx.symbolic_trace(Diamond())
    n = by_name(gm)
    assert ancestors(n["l2"]) == {n["l2"], n["relu"], n["l1"], n["x"]}
    assert ancestors(n["x"]) == {n["x"]}
    assert ancestors(n["add"]) == {n["add"], n["l2"], n["relu"], n["l1"], n["l3"], n["x"]}


# -- insertion and outputs ---------------------------------------------------------------------
class Times(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x * self.k


def test_insert_module_after_routes_every_user():
    torch.manual_seed(0)
    model = Diamond()
    gm = fx.symbolic_trace(model)
    x = torch.randn(3, 4)
    ShapeProp(gm).propagate(x)
    n = by_name(gm)
    new = insert_module_after(gm, n["x"], "scale", Times(2.0))
    gm.recompile()
    assert isinstance(gm.get_submodule("scale"), Times)
    assert new.op == "call_module" and new.target == "scale" and new.args == (n["x"],)
    assert set(n["x"].users) == {new}  # l1 and l3 now read the scaled value
    assert set(new.users) == {n["l1"], n["l3"]}
    assert new.meta["tensor_meta"] is n["x"].meta["tensor_meta"]
    torch.testing.assert_close(gm(x), model(2.0 * x))


def test_insert_module_after_an_inner_node_belongs_to_the_same_owner():
    torch.manual_seed(0)
    model = Net()
    net = fx.symbolic_trace(model)
    n = by_name(net)
    x = torch.randn(2, 4)
    ref = net(x)
    new = insert_module_after(net, n["b_act"], "b.extra", Times(-1.0))
    net.recompile()
    leaf_stack = list(n["b_act"].meta["nn_module_stack"].values())
    assert list(new.meta["nn_module_stack"].values()) == [*leaf_stack[:-1], ("b.extra", Times)]
    manual = model.head(torch.flatten(-model.b.act(model.b.fc(x)) + x, 1))
    torch.testing.assert_close(net(x), manual)
    assert not torch.allclose(net(x), ref)


def test_feeds_model_output_unshaped_graph():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x)
            return torch.flatten(self.b(h).view(2, 2, 2), 1)

    gm = fx.symbolic_trace(M())
    n = by_name(gm)
    assert feeds_model_output(n["b"], gm)  # through view and flatten
    assert feeds_model_output(n["flatten"], gm)
    assert not feeds_model_output(n["a"], gm)  # b is no pass-through


def test_feeds_model_output_shaped_graph_reads_the_mark():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x).reshape(-1)

    gm = fx.symbolic_trace(M())
    ShapeProp(gm).propagate(torch.randn(2, 4))
    n = by_name(gm)
    # shaped but never marked: the graph output is not assumed to be a model output
    assert not feeds_model_output(n["a"], gm)
    n["reshape"].meta["gt_model_output"] = True
    assert feeds_model_output(n["a"], gm)
    assert feeds_model_output(n["reshape"], gm)


def test_feeds_model_output_stops_at_a_compute_op():
    class M(nn.Module):
        def forward(self, x):
            return torch.relu(x)

    gm = fx.symbolic_trace(M())
    n = by_name(gm)
    assert feeds_model_output(n["relu"], gm)
    assert not feeds_model_output(n["x"], gm)


# -- node kinds ------------------------------------------------------------------------------
def test_is_dropout():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.1)
            self.drop2d = nn.Dropout2d(0.1)
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.drop2d(self.drop(self.fc(x)).unsqueeze(-1)).squeeze(-1)
            return F.dropout(y, 0.2, self.training) + F.alpha_dropout(y, 0.1)

    gm = fx.symbolic_trace(M())
    kinds_by_node = {n.name: is_dropout(n, gm) for n in gm.graph.nodes}
    assert kinds_by_node["drop"] and kinds_by_node["drop2d"]
    assert kinds_by_node["dropout"] and kinds_by_node["alpha_dropout"]
    assert not kinds_by_node["fc"] and not kinds_by_node["add"] and not kinds_by_node["x"]
    assert not kinds_by_node["unsqueeze"]


def test_mutates_input_traced_forms():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.r_in = nn.ReLU(inplace=True)
            self.r_out = nn.ReLU()

        def forward(self, x):
            a = self.r_in(x)
            b = self.r_out(a)
            c = F.relu(b, inplace=True)
            d = F.relu(c, True)
            e = F.relu(d)
            f = e.relu_()
            g = f.add(1)
            h = torch.add(g, 1)
            i = F.dropout(h, 0.5, True)  # a trailing True that is `training`, not inplace
            j = F.leaky_relu(i, 0.1, True)
            return j.__neg__() if False else j.neg()

    gm = fx.symbolic_trace(M())
    got = {n.name: mutates_input(n, gm) for n in gm.graph.nodes if n.op not in ("placeholder", "output")}
    assert got == {
        "r_in": True, "r_out": False, "relu": True, "relu_1": True, "relu_2": False, "relu_": True,
        "add": False, "add_1": False, "dropout": False, "leaky_relu": True, "neg": False,
    }


def test_mutates_input_operators():
    graph = fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    iadd = graph.call_function(operator.iadd, (x, y))
    add = graph.call_function(operator.add, (iadd, y))
    setitem = graph.call_function(operator.setitem, (add, 0, 1.0))
    dunder = graph.call_method("__add__", (add, y))
    graph.output((add, setitem, dunder))
    gm = fx.GraphModule(nn.Module(), graph)
    assert mutates_input(iadd, gm)
    assert not mutates_input(add, gm)
    assert mutates_input(setitem, gm)
    assert not mutates_input(dunder, gm)  # a dunder is not a trailing-underscore in-place method


# -- kinds ---------------------------------------------------------------------------------------
class Custom(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize(
    "module,builtin",
    [
        (nn.Linear(2, 2), True),
        (nn.Conv2d(1, 1, 1), True),
        (nn.ReLU(), True),
        (nn.Sequential(nn.ReLU()), False),
        (nn.ModuleList([nn.ReLU()]), False),
        (nn.ModuleDict({"a": nn.ReLU()}), False),
        (fx.symbolic_trace(nn.Sequential(nn.ReLU())), False),
        (Custom(), False),
        (ChannelLayerNorm(4), True),
        (torch.ao.nn.quantized.FloatFunctional(), True),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v),
)
def test_is_builtin_module(module, builtin):
    assert kinds.is_builtin_module(module) is builtin


def test_dropout_tables_cover_every_torch_dropout():
    torch_dropouts = {c for c in vars(nn).values() if isinstance(c, type) and issubclass(c, nn.Module)
                      and "Dropout" in c.__name__}
    assert torch_dropouts and torch_dropouts <= set(kinds.DROPOUT_MODULES)
    fns = {getattr(F, n) for n in dir(F) if n.endswith("dropout") or n[:-2].endswith("dropout")}
    assert fns <= kinds.DROPOUT_FUNCTIONS


@pytest.mark.parametrize("module", [nn.BatchNorm1d(4), nn.BatchNorm2d(4), nn.InstanceNorm2d(4, affine=True),
                                    nn.LayerNorm(4), nn.GroupNorm(2, 4), nn.RMSNorm(4), ChannelLayerNorm(4)])
def test_norm_types_are_norms_with_a_scale(module):
    assert isinstance(module, kinds.NORM_TYPES)
    assert getattr(module, "weight", None) is not None


def test_norm_types_exclude_other_layers():
    for module in (nn.Linear(2, 2), nn.LocalResponseNorm(2), nn.Dropout(), nn.Identity()):
        assert not isinstance(module, kinds.NORM_TYPES)


def test_tables_hold_what_fx_records():
    class M(nn.Module):
        def forward(self, x):
            y = torch.flatten(x, 1).view(2, -1).reshape(-1)
            z = F.layer_norm(x, (3,))
            return y, F.dropout(z), torch.unsqueeze(y, 0)

    gm = fx.symbolic_trace(M())
    n = by_name(gm)
    assert n["flatten"].target in kinds.PASS_THROUGH_FUNCTIONS
    assert n["unsqueeze"].target in kinds.PASS_THROUGH_FUNCTIONS
    assert {n["view"].target, n["reshape"].target} <= kinds.VIEW_METHODS
    assert kinds.NORM_FUNCTIONS[n["layer_norm"].target] == "layer_norm"
    assert n["dropout"].target in kinds.DROPOUT_FUNCTIONS
    # methods that write into their input are no views
    assert not {"add_", "relu_", "copy_", "fill_"} & kinds.VIEW_METHODS


# -- bugs these tests found (fixed) -------------------------------------------------------------
def test_unique_attr_name_skips_parameters_and_buffers():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    gm = fx.symbolic_trace(model)
    assert unique_attr_name(gm, "0", "weight") == "0.weight_1"
    assert unique_attr_name(gm, "1", "running_mean") == "1.running_mean_1"


def test_insert_module_after_a_function_keeps_the_owner():
    class B(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.tanh(self.fc(x))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = B()

        def forward(self, x):
            return self.b(x)

    gm = fx.symbolic_trace(M())
    tanh = by_name(gm)["tanh"]
    assert owner_path(tanh) == "b"
    new = insert_module_after(gm, tanh, "b.drop", nn.Dropout())
    assert owner_path(new) == "b"


def test_insert_module_after_a_leaf_is_not_part_of_the_leaf(net):
    n = by_name(net)
    new = insert_module_after(net, n["b_act"], "b.drop", nn.Dropout())
    assert owner_path(new) == "b"
    assert module_nodes(net.graph, "b.act") == [n["b_act"]]
