"""The rewritten model is the user's model: class, methods, module tree, hooks and state updates.

Property tests over random architectures with the user's hooks, blocks that update buffers in
forward, one block under two names, and data-dependent branches (``tests/strategies.py`` with
``state=True``); then real models: timm's methods, ``torch.utils.checkpoint`` of a block, pickling.
"""

from __future__ import annotations

import copy
import importlib
import io
import json
import warnings
from collections import Counter

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import graphtricks as gt
from graphtricks.fxgraph.adopt import original_class
from graphtricks.io.inputs import make_example_inputs
from graphtricks.passes import PASSES
from tests.strategies import architectures, build_from_config
from tests.test_properties import _settings

# Passes that keep every module at its path (residual moves a block under ``body``, tested apart).
_PASSES = {"dropout": {"p": 0.2}, "init": {"seed": 1}, "bn_to_ln": {}}


def _fired(model: nn.Module, inputs: tuple) -> Counter:
    """How often each module (by every name it has) is called in one eval forward."""
    counts: Counter = Counter()
    handles = [m.register_forward_hook(lambda mod, a, o, name=name: counts.update([name]))
               for name, m in model.named_modules(remove_duplicate=False)]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return counts


def _build(config: dict) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return build_from_config(json.dumps(config)).eval(), make_example_inputs([tuple(config["input"])], seed=0)


@_settings(30)
@given(data=st.data(), config=architectures(state=True),
       names=st.lists(st.sampled_from(sorted(_PASSES)), max_size=2, unique=True))
def test_a_rewrite_keeps_class_tree_hooks_and_calls(data, config, names):
    model, inputs = _build(config)
    paths = [name for name, _ in model.named_modules(remove_duplicate=False)]
    hooked = data.draw(st.lists(st.sampled_from(paths), unique=True, max_size=3), label="hooked")
    user: Counter = Counter()
    for path in hooked:
        model.get_submodule(path).register_forward_hook(lambda m, a, o, path=path: user.update([path]))
    with torch.no_grad():
        reference = model(*inputs)
    want = Counter(user)
    before = dict(model.named_modules(remove_duplicate=False))
    called_before = _fired(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = gt.rewrite(model, [PASSES[n](**_PASSES[n]) for n in names], inputs)
    rewritten = result.model.eval()

    user.clear()
    with torch.no_grad():
        out = rewritten(*inputs)
    preserves = all(PASSES[n].preserves_eval for n in names)
    if preserves:
        assert torch.equal(out, reference)
    # New weights (init) or norms may send a data-dependent branch the other way: then calls differ.
    same_path = preserves or not any(b["kind"] == "branch" for b in config["blocks"])
    if same_path:
        assert user == want, "the user's hooks fire once per call, as before the rewrite"

    after = dict(rewritten.named_modules(remove_duplicate=False))
    assert set(before) <= set(after), "every module keeps its name"
    replaced = {c.where for c in result.report.changes if c.action == "replaced"}
    replaced |= {p for p in before if any(before[p] is before[q] for q in replaced if q in before)}  # aliases
    for path, module in before.items():
        if path not in replaced:
            assert isinstance(after[path], type(module)), f"{path} lost its class"
            assert original_class(after[path]) is type(module)
    for path, module in before.items():  # one module under two names stays one module
        for other, same in before.items():
            if same is module and other != path:
                assert after[path] is after[other]

    # Blocks are called modules: a hook registered after the rewrite fires as it would have before.
    called_after = _fired(rewritten, inputs)
    # fx names a module under two names by its first: the report names it so, the hook may say the other
    inlined = {p for p in before if any(before[p] is before[q] for q in result.report.inlined if q in before)}
    missing = {p: (n, called_after.get(p)) for p, n in called_before.items()
               if called_after.get(p) != n and p not in inlined}
    assert not missing or not same_path, missing
    # Only a block called in two ways (dropout put in each call apart) may stay inlined, and says so.
    assert all("different" in why for why in result.report.inlined.values()), result.report.inlined


@_settings(20)
@given(config=architectures(state=True))
def test_train_calls_update_buffers_as_the_original_does(config):
    model, inputs = _build(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rewritten = gt.rewrite(model, [gt.InsertDropout(p=0.3)], inputs).model
    original = copy.deepcopy(model)
    added = set(dict(rewritten.named_modules())) - set(dict(original.named_modules()))
    for m in (original, rewritten):
        m.train()
    for name in added:  # dropout off: the rest of the model trains as it would
        rewritten.get_submodule(name).eval()
    for step in range(3):
        for m in (original, rewritten):
            torch.manual_seed(step)
            m(*inputs)
    buffers = dict(rewritten.named_buffers())
    for name, value in original.named_buffers():
        assert torch.equal(buffers[name], value), name


def test_counter_updates_survive_and_the_probe_leaves_them():
    from tests.strategies import Counter as CounterBlock

    spec = {"kind": "counter", "inner": {"kind": "layer", "layer": {"type": "linear", "cin": 4, "cout": 4, "bias": True},
                                          "order": ["layer", "norm", "act", "drop"], "norm": None,
                                          "act": {"name": "relu", "form": "functional", "inplace": False}, "drop": None}}
    model = nn.Sequential(CounterBlock(spec), nn.Linear(4, 2)).eval()
    x = torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = gt.rewrite(model, [gt.InsertDropout(p=0.2)], x)
    block = result.model[0]
    assert isinstance(block, CounterBlock) and int(block.steps) == 0, "the rewrite's own forwards leave state alone"
    for _ in range(4):
        result.model(x)
    assert int(block.steps) == 4


# -- real models ------------------------------------------------------------------------------
timm = pytest.importorskip("timm")


def _timm_rewritten(name: str = "resnet18"):
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = gt.rewrite(model, [gt.InsertDropout(p=0.1)], x)
    return model, result, x


def test_timm_methods_work_on_the_rewritten_model():
    model, result, x = _timm_rewritten()
    rm = result.model.eval()
    assert isinstance(rm, type(model))
    with torch.no_grad():
        feats = rm.forward_features(x)
        assert torch.equal(rm.forward_head(feats), rm(x))
        assert torch.equal(feats, model.forward_features(x))
    assert rm.get_classifier() is rm.fc
    rm.reset_classifier(3)
    assert rm.fc.out_features == 3
    assert not result.report.inlined


def test_a_flag_the_graph_was_specialised_on_re_specialises_when_it_changes():
    model, result, x = _timm_rewritten()
    rm = result.model.train()
    assert "act1_dropout" in rm.code  # the root's own code carries an edit: it runs a graph
    rm.set_grad_checkpointing(True)  # fx ran ``if self.grad_checkpointing`` once, with False
    calls: Counter = Counter()
    handle = rm.layer1[0].register_forward_pre_hook(lambda m, a: calls.update(["block"]))
    rm(x).sum().backward()
    handle.remove()
    assert calls["block"] == 2, "checkpointed: the block runs again in backward"
    assert "checkpoint_seq" in rm.code and "act1_dropout" in rm.code  # traced again, the same edit
    rm.set_grad_checkpointing(False)
    rm(x).sum().backward()
    assert "checkpoint_seq" not in rm.code


def test_checkpointing_a_rewritten_block_trains():
    from torch.utils.checkpoint import checkpoint

    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rm = gt.rewrite(model, [gt.InsertDropout(p=0.1)], x).model.train()
    h = rm.maxpool(rm.relu(rm.bn1(rm.conv1(x))))
    out = checkpoint(rm.layer1, h, use_reentrant=False)
    assert "dropout" in rm.layer1[0].code  # the block itself carries the technique
    out.sum().backward()
    assert rm.layer1[0].conv1.weight.grad is not None


def test_pickle_and_deepcopy_keep_the_class_and_tree():
    model, result, x = _timm_rewritten()
    rm = result.model.eval()
    buffer = io.BytesIO()
    torch.save(rm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False).eval()
    copied = copy.deepcopy(rm)
    for other in (loaded, copied):
        assert isinstance(other, type(model)) and isinstance(other.layer1[0], type(model.layer1[0]))
        assert [n for n, _ in other.named_modules()] == [n for n, _ in rm.named_modules()]
        with torch.no_grad():
            assert torch.equal(other(x), rm(x))
    copied.layer1[0].act1 = nn.Identity()  # a copy is independent
    assert not isinstance(rm.layer1[0].act1, nn.Identity)


def test_a_fold_that_fails_halfway_leaves_the_flat_graph_and_says_why(monkeypatch):
    fold = importlib.import_module("graphtricks.capturing.fold")
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    real, seen = fold.adopt_graph, []

    def flaky(module, graph):  # the third module refuses its graph, after two took theirs
        seen.append(module)
        if len(seen) == 3:
            raise RuntimeError("boom")
        return real(module, graph)

    monkeypatch.setattr(fold, "adopt_graph", flaky)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = gt.rewrite(model, [gt.InsertDropout(p=0.1)], x)
    rm = result.model.eval()
    assert "boom" in result.report.inlined[""]
    for name, module in rm.named_modules():  # put back: only the region root runs a graph (the flat one)
        assert (name == "") == isinstance(module, torch.fx.GraphModule) or "dropout" in name, name
    with torch.no_grad():
        assert torch.equal(rm(x), model(x))


class _Switch(nn.Module):
    """A block whose forward branches on an int attribute (fx runs the condition once)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.mode = 1

    def forward(self, x):
        return self.fc(x) if self.mode == 1 else -self.fc(x)


class _Act(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x)) * 2


def test_a_module_no_pass_edited_keeps_its_own_forward():
    model = nn.Sequential(_Act(), _Switch(), nn.Linear(4, 2)).eval()
    x = torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = gt.rewrite(model, [gt.InsertDropout(p=0.2)], x)
    rm = result.model.eval()
    edited, untouched = rm[0], rm[1]
    assert isinstance(edited, torch.fx.GraphModule) and "dropout" in edited.code  # dropout after its relu
    assert type(untouched) is _Switch, "no pass changed it: it runs the user's forward, not a graph"
    with torch.no_grad():
        assert torch.equal(rm(x), model(x))
        rm[1].mode = model[1].mode = 2  # its own Python runs: the other branch is taken
        assert torch.equal(rm(x), model(x))


def test_what_a_pass_erased_or_rewired_is_an_edit():
    fold = importlib.import_module("graphtricks.capturing.fold")
    model = nn.Sequential(_Act(), _Act(), _Switch()).eval()
    x = torch.randn(3, 4)
    tree = gt.capture(model, (x,))
    region = tree.root
    graph = region.module.graph
    relu = next(n for n in graph.nodes if n.target is torch.relu)  # the first block's
    relu.replace_all_uses_with(relu.args[0])
    graph.erase_node(relu)
    mul = [n for n in graph.nodes if n.op == "call_function" and "mul" in str(n.target)][1]  # the second block's
    with graph.inserting_before(mul):
        neg = graph.call_function(torch.neg, (mul.args[0],))
        neg.meta["nn_module_stack"] = dict(mul.meta["nn_module_stack"])
    mul.args = (neg, *mul.args[1:])
    region.module.recompile()
    fold.fold_region(region)
    m = tree.model
    assert isinstance(m[0], torch.fx.GraphModule) and "relu" not in m[0].code
    assert isinstance(m[1], torch.fx.GraphModule) and "neg" in m[1].code
    assert type(m[2]) is _Switch
    with torch.no_grad():
        h = model[0].fc(x) * 2
        h = -torch.relu(model[1].fc(h)) * 2
        assert torch.allclose(m(x), model[2](h))
