"""The fast forward of traced regions: same results as fx's forward, less overhead, nothing lost."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import fx, nn
from torch.nn.modules.module import register_module_forward_hook

import graphtricks as gt
from graphtricks.fxgraph.fastpath import is_sped_up, restore_fx_forward, speed_up
from graphtricks.onnx.torchscript import export_mode
from tests.conftest import EXAMPLE_MODELS, example

DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def _traced(model: nn.Module) -> list[fx.GraphModule]:
    return [m for m in model.modules() if isinstance(m, fx.GraphModule)]


def _pair(model: nn.Module, inputs: tuple, passes=None) -> tuple[nn.Module, nn.Module]:
    """(rewritten with fx's forward, the same rewrite with every traced region sped up)."""
    passes = passes or (lambda: [gt.InsertDropout(p=0.5)])
    plain = gt.rewrite(model, passes(), inputs).model
    for gm in _traced(plain):  # whether or not rewrite() sped it up
        restore_fx_forward(gm)
        assert not is_sped_up(gm)
    result = gt.rewrite(model, passes(), inputs)
    # every module with a graph of its own (each block keeps one), whether rewrite() sped it up or not
    graphs = _traced(result.model)
    assert graphs and any([speed_up(gm) for gm in graphs])
    return plain, result.model


def _seeded(model: nn.Module, inputs: tuple, seed: int = 0):
    torch.manual_seed(seed)
    return model(*inputs)


def _cnn_pair(p: float = 0.5, **dropout):
    model, inputs = example("models/plain_cnn.py:PlainCNN")
    plain, fast = _pair(model, inputs, lambda: [gt.InsertDropout(p=p, **dropout)])
    return plain, fast, inputs


def _dropout_calls(monkeypatch) -> list[nn.Module]:
    """Records every call of a dropout module's forward (a class patch, not a hook: hooks disable skipping)."""
    calls = []
    for cls in DROPOUTS:
        original = cls.forward

        def counted(self, input, _original=original):
            calls.append(self)
            return _original(self, input)

        monkeypatch.setattr(cls, "forward", counted)
    return calls


@pytest.mark.parametrize("spec", sorted(EXAMPLE_MODELS), ids=lambda s: s.split(":")[1])
def test_outputs_match_fx_forward_in_both_modes(spec):
    model, inputs = example(spec)
    passes = lambda: [gt.InsertDropout(p=0.5), gt.BatchNormToLayerNorm()]
    if not _traced(gt.rewrite(model, passes(), inputs).model):
        # TinyEncoder: its blocks read the mode (kept as written, their GELU gets dropout at the
        # caller) and its root's own code has no edit (its own forward): no module runs a graph.
        pytest.skip("no module of this rewrite runs a graph")
    plain, fast = _pair(model, inputs, passes)
    with torch.no_grad():
        assert torch.equal(plain.eval()(*inputs), fast.eval()(*inputs))
        assert torch.equal(_seeded(plain.train(), inputs), _seeded(fast.train(), inputs))


def test_eval_skips_dropout_calls_and_train_makes_them(monkeypatch):
    plain, fast, inputs = _cnn_pair()
    calls = _dropout_calls(monkeypatch)
    with torch.no_grad():
        fast.eval()(*inputs)
        assert calls == []
        plain.eval()(*inputs)
        assert len(calls) == 3  # fx's forward calls them: the skip is the fast path's doing
        calls.clear()
        fast.train()(*inputs)
    assert len(calls) == 3


def test_one_dropout_in_train_mode_still_drops():
    plain, fast, inputs = _cnn_pair()
    with torch.no_grad():
        reference = fast.eval()(*inputs)
        for model in (plain, fast):
            model.eval()
            model.get_submodule("features.5_dropout").train()
        dropped = _seeded(fast, inputs)
        assert not torch.equal(dropped, reference)
        assert torch.equal(dropped, _seeded(plain, inputs))
        fast.get_submodule("features.5_dropout").eval()  # and back: the identity again
        assert torch.equal(fast(*inputs), reference)


def test_mode_toggles_on_the_whole_model():
    plain, fast, inputs = _cnn_pair()
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(_seeded(plain.train(), inputs, 3), _seeded(fast.train(), inputs, 3))
            assert torch.equal(plain.eval()(*inputs), fast.eval()(*inputs))


def test_hooks_and_patched_forwards_see_their_calls_in_eval():
    _, fast, inputs = _cnn_pair()
    fast.eval()
    seen = []
    dropout = fast.get_submodule("features.2_dropout")
    handle = dropout.register_forward_hook(lambda m, args, out: seen.append("hook"))
    with torch.no_grad():
        fast(*inputs)
    handle.remove()
    handle = register_module_forward_hook(lambda m, args, out: seen.append(type(m)) if isinstance(m, nn.Dropout) else None)
    with torch.no_grad():
        fast(*inputs)
    handle.remove()
    dropout.forward = lambda input: seen.append("patched") or input  # as offloading wrappers do
    with torch.no_grad():
        fast(*inputs)
    assert seen == ["hook", nn.Dropout, nn.Dropout, nn.Dropout, "patched"]


def test_a_torch_function_mode_sees_eval_dropout():
    _, fast, inputs = _cnn_pair()
    seen = []

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is nn.functional.dropout:
                seen.append(func)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Watch():
        fast.eval()(*inputs)
    assert len(seen) == 3


def test_replaced_submodules_are_used():
    plain, fast, inputs = _cnn_pair()
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
    features = copy.deepcopy(plain.features)
    with torch.no_grad():
        getattr(features, "3").weight.mul_(-1)
    for model in (plain, fast):
        setattr(model.features, "0", copy.deepcopy(conv))  # a leaf
        setattr(model.features, "5_dropout", _Double())  # a dropout, by something else
        model.head = nn.Linear(64, 10)  # a top-level one
        model.head.load_state_dict(plain.head.state_dict())
    with torch.no_grad():
        assert torch.equal(plain.eval()(*inputs), fast.eval()(*inputs))
        before = fast(*inputs)
        for model in (plain, fast):
            model.features = copy.deepcopy(features)  # a whole path
            setattr(model.features, "2_dropout", nn.Dropout(0.9).train())  # a new, training dropout
        assert torch.equal(_seeded(plain, inputs), _seeded(fast, inputs))
        assert not torch.equal(_seeded(fast, inputs), before)


class _Double(nn.Module):
    def forward(self, x):
        return 2 * x


def test_deepcopy_is_fast_and_independent():
    plain, fast, inputs = _cnn_pair()
    twin = copy.deepcopy(fast)
    # The root's own code is unedited (it runs its own forward); its features run a graph.
    assert is_sped_up(twin.features) and is_sped_up(fast.features)
    assert type(twin.features) is not type(fast.features)
    with torch.no_grad():
        assert torch.equal(twin.eval()(*inputs), plain.eval()(*inputs))
        setattr(twin.features, "0", nn.Conv2d(3, 16, 3, padding=1, bias=False))
        assert not torch.equal(twin(*inputs), fast.eval()(*inputs))
        assert torch.equal(fast(*inputs), plain(*inputs))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_retrace_and_rewrite_again_give_the_same_graph(mode):
    plain, fast, inputs = _cnn_pair()
    for model in (plain, fast):
        model.train(mode == "train")
    assert str(fx.symbolic_trace(fast).graph) == str(fx.symbolic_trace(plain).graph)
    again = [gt.rewrite(m, [gt.InsertDropout(p=0.1, activations=["ReLU"])], inputs).model for m in (plain, fast)]
    codes = [[m.code for m in _traced(model)] for model in again]
    assert codes[1] == codes[0]
    assert "dropout" in again[1].features.code  # in the block that owns the activation


def test_gradients_match():
    plain, fast, inputs = _cnn_pair()
    for model in (plain, fast):
        _seeded(model.train(), inputs).square().sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), fast.named_parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_graph_code_and_state_dict_untouched():
    model, inputs = example("models/plain_cnn.py:PlainCNN")
    gm = gt.rewrite(model, [gt.InsertDropout(p=0.5)], inputs).model.features  # the module with the edits
    restore_fx_forward(gm)
    graph, code, keys = str(gm.graph), gm.code, list(gm.state_dict())
    nodes = list(gm.graph.nodes)
    assert speed_up(gm) and speed_up(gm) and is_sped_up(gm)  # twice: harmless
    assert str(gm.graph) == graph and list(gm.graph.nodes) == nodes
    assert gm.code == code and list(gm.state_dict()) == keys
    twin = gt.rewrite(model, [gt.InsertDropout(p=0.5)], inputs).model.features
    twin.load_state_dict(gm.state_dict())


class _Quoting(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        return self.head(x), "self.head("


def test_code_it_cannot_read_keeps_fx_forward():
    gm = fx.symbolic_trace(_Quoting())
    assert not speed_up(gm) and not is_sped_up(gm)  # the string looks like a second call site
    x = torch.randn(2, 4)
    assert torch.equal(gm(x)[0], gm.head(x)) and gm(x)[1] == "self.head("
    with pytest.raises(TypeError, match="GraphModule"):
        speed_up(nn.Linear(2, 2))


def test_recompile_after_an_edit_keeps_a_matching_fast_forward():
    plain, fast, inputs = _cnn_pair()
    for model in (plain.features, fast.features):  # the module with the edits runs a graph
        output = next(n for n in model.graph.nodes if n.op == "output")
        with model.graph.inserting_before(output):
            doubled = model.graph.call_function(torch.mul, (output.args[0], 2.0))
        output.args = (doubled,)
        model.recompile()
    assert is_sped_up(fast.features) and "torch.mul" in fast.features.code
    with torch.no_grad():
        assert torch.equal(plain.eval()(*inputs), fast.eval()(*inputs))


def test_torchscript_falls_back_to_fx_forward():
    plain, fast, inputs = _cnn_pair()
    scripted = torch.jit.script(fast.eval())
    with torch.no_grad():
        assert torch.equal(scripted(*inputs), plain.eval()(*inputs))


def test_torchscript_trace_records_every_module_call():
    plain, fast, inputs = _cnn_pair()
    kinds = [[n.kind() for n in torch.jit.trace(m.eval(), inputs).inlined_graph.nodes()] for m in (plain, fast)]
    assert kinds[1] == kinds[0] and kinds[1].count("aten::dropout") == 3


@pytest.mark.parametrize("train", [True, False], ids=["train", "inference"])
def test_onnx_export_keeps_dropouts_in_train_graph_only(train):
    plain, fast, inputs = _cnn_pair(p=0.1)
    graphs = [export_mode(m, inputs, train=train, opset=17)[0] for m in (plain, fast)]
    ops = [[n.op_type for n in g.graph.node] for g in graphs]
    assert ops[1] == ops[0]
    assert ops[1].count("Dropout") == (3 if train else 0)


def test_channel_dropout_skipped_only_at_its_rank(monkeypatch):
    plain, fast, inputs = _cnn_pair(kind="channel")
    assert isinstance(fast.get_submodule("features.2_dropout"), nn.Dropout2d)
    calls = _dropout_calls(monkeypatch)
    with torch.no_grad():
        assert torch.equal(plain.eval()(*inputs), fast.eval()(*inputs))
        assert len(calls) == 3  # fx's forward only
        assert torch.equal(_seeded(plain.train(), inputs), _seeded(fast.train(), inputs))
    # On an input of another rank Dropout2d warns and squeezes: it must then be called.
    gm = fx.symbolic_trace(nn.Sequential(nn.Dropout2d(0.5))).eval()
    assert speed_up(gm)
    calls.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = gm(torch.ones(3, 4, 4))
    assert len(calls) == 1 and caught and torch.equal(out, torch.ones(3, 4, 4))


def test_ddp_trains_the_fast_model_like_fx(tmp_path):
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch was built without the gloo backend")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        losses = []
        for model in _cnn_pair(p=0.1)[:2]:
            ddp = nn.parallel.DistributedDataParallel(model.train())
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
            gen = torch.Generator().manual_seed(0)
            data, target = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
            torch.manual_seed(1)
            run = []
            for _ in range(3):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(ddp(data), target)
                loss.backward()
                opt.step()
                run.append(loss.item())
            losses.append(run)
    finally:
        dist.destroy_process_group()
    assert losses[0] == losses[1]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_match(name):
    torchvision = pytest.importorskip("torchvision")

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    inputs = (torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)),)
    plain, fast = _pair(model, inputs, lambda: [gt.InsertDropout(p=0.2)])
    assert any(is_sped_up(gm) for gm in _traced(fast))
    with torch.no_grad():
        assert torch.equal(plain.eval()(*inputs), fast.eval()(*inputs))
        assert torch.equal(_seeded(plain.train(), inputs), _seeded(fast.train(), inputs))


def test_rewrite_speeds_up_every_traced_region_and_a_full_pickle_round_trip_works():
    model, inputs = example("models/plain_cnn.py:PlainCNN")
    result = gt.rewrite(model, [gt.InsertDropout(p=0.5)], inputs)
    calling = [m for m in _traced(result.model) if any(n.op == "call_module" for n in m.graph.nodes)]
    assert calling and all(is_sped_up(gm) for gm in calling)
    buffer = io.BytesIO()
    torch.save(result.model, buffer)  # a whole GraphModule: fx re-creates its tracer on load
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # rebuilt with fx's own forward: slower, same values
    with torch.no_grad():
        assert torch.equal(loaded.eval()(*inputs), result.model.eval()(*inputs))
