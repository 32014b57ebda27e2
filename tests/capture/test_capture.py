"""Capture keeps train-mode behaviour, survives untraceable code, and records shapes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphtricks as gt
from graphtricks.errors import InputShapeError, PassError
from graphtricks.passes.base import GraphtricksPass
from graphtricks.capturing.shapes import tensor_meta
from tests.conftest import example


def _same_train_output(original: nn.Module, rewritten: nn.Module, x: torch.Tensor) -> bool:
    original, rewritten = copy.deepcopy(original).train(), copy.deepcopy(rewritten).train()
    torch.manual_seed(123)
    a = original(x)
    torch.manual_seed(123)
    b = rewritten(x)
    return torch.equal(a, b)


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(F.dropout(self.fc1(x).relu(), 0.5, self.training))


class TrainingBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.noise = nn.Linear(16, 16)

    def forward(self, x):
        x = self.fc(x)
        if self.training:
            x = x + 0.1 * torch.randn_like(x)
        return x


class Outer(nn.Module):
    """A traceable parent around a mode-dependent child: only the child may become opaque."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(16, 16)
        self.branch = TrainingBranch()
        self.post = nn.Linear(16, 4)
        self.unused = nn.Linear(3, 3)  # never called: its weights must survive capture

    def forward(self, x):
        return self.post(torch.relu(self.branch(self.pre(x))))


@pytest.mark.parametrize("cls", [FunctionalDropout, Outer])
def test_empty_rewrite_keeps_train_and_eval_behaviour(cls):
    torch.manual_seed(0)
    model, x = cls(), torch.randn(8, 16)
    result = gt.rewrite(model, [], (x,))
    assert _same_train_output(model, result.model, x)
    model.eval(), result.model.eval()
    assert torch.equal(model(x), result.model(x))


def test_mode_dependent_child_is_opaque_not_its_parent():
    result = gt.rewrite(Outer(), [], (torch.randn(4, 16),))
    assert result.tree.root.kind == "traced"
    opaque = [r for r in result.tree.regions() if r.kind == "opaque"]
    assert [r.path for r in opaque] == ["branch"]
    assert "self.training" in opaque[0].reason


def test_functional_dropout_in_traced_graph_follows_mode():
    torch.manual_seed(0)
    model, x = FunctionalDropout(), torch.randn(64, 16)
    rewritten = gt.rewrite(model, [], (x,)).model
    rewritten.train()
    assert not torch.equal(rewritten(x), rewritten(x)), "train-mode dropout must stay random after capture"
    rewritten.eval()
    assert torch.equal(rewritten(x), rewritten(x))


def test_timm_droppath_and_torchvision_stochastic_depth_keep_train_mode():
    timm = pytest.importorskip("timm")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, drop_path_rate=0.2, img_size=32, patch_size=8)
    effnet = torchvision.models.efficientnet_b0(weights=None, stochastic_depth_prob=0.5)
    for model, kind in ((vit, "DropPath"), (effnet, "StochasticDepth")):
        x = torch.randn(2, 3, 32, 32)
        result = gt.rewrite(model, [], (x,))
        kinds = {type(r.module).__name__ for r in result.tree.regions() if r.kind == "opaque"}
        assert kinds == {kind}, kinds
        assert result.tree.root.kind == "traced"
        assert _same_train_output(model, result.model, x)


def test_untraceable_top_level_captures_children():
    model, (x,) = example("models/control_flow.py:DataDependent")
    result = gt.rewrite(model, [], (x,))
    root = result.tree.root
    assert root.kind == "opaque" and "not traceable" in root.reason
    assert {r.path: r.kind for r in root.children if r.path in ("stem", "extra")} == {"stem": "traced", "extra": "traced"}
    assert torch.equal(model(x), result.model.eval()(x))


def test_tf_efficientnetv2_only_the_untraceable_convs_are_opaque():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnetv2_b0", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    result = gt.rewrite(model, [], (x,))
    assert result.tree.root.kind == "traced"
    reasons = {type(r.module).__name__ for r in result.tree.regions() if r.kind == "opaque"}
    assert reasons <= {"Conv2dSame", "BatchNormAct2d"}
    assert result.tree.traced_fraction() > 0.9
    assert torch.allclose(model(x), result.model(x), atol=1e-6)


def test_hugging_face_bert_intermediate_traces_inside_opaque_parents():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 7))
    result = gt.rewrite(model, [gt.InsertDropout(0.1)], (ids,))
    traced = {r.path for r in result.tree.regions() if r.kind == "traced"}
    assert "encoder.layer.0.intermediate" in traced or any(p.startswith("encoder.layer.0.intermediate") for p in traced)
    assert any(c.where.startswith("encoder.layer.0.intermediate") for c in result.report.changes)
    ref = model(ids).last_hidden_state
    assert torch.equal(ref, result.model.eval()(ids).last_hidden_state)


def test_state_dict_and_caller_model_are_kept():
    torch.manual_seed(0)
    model, x = Outer().eval(), torch.randn(4, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = gt.rewrite(model, [gt.InsertDropout(0.3)], (x,))
    after = result.model.state_dict()
    for key, value in before.items():
        assert key in after, key
        assert torch.equal(after[key], value)
        assert torch.equal(model.state_dict()[key], value)
    assert not model.training and all(not m.training for m in model.modules())
    assert not any(isinstance(m, nn.Dropout) for m in model.modules()), "the caller's model was modified"


def test_inplace_shares_tensors():
    model, x = Outer(), torch.randn(4, 16)
    result = gt.rewrite(model, [gt.InsertDropout(0.3)], (x,), inplace=True)
    assert result.model.state_dict()["pre.weight"].data_ptr() == model.pre.weight.data_ptr()


class Explodes(GraphtricksPass):
    name = "explodes"

    def call(self, graph_module):
        raise RuntimeError("boom")


def test_mode_restored_when_a_pass_fails():
    model = Outer()
    model.train()
    model.branch.eval()  # a mixed state must come back exactly
    with pytest.raises(PassError, match="explodes.*boom"):
        gt.rewrite(model, [Explodes()], (torch.randn(4, 16),), inplace=True)
    assert model.training and model.pre.training and not model.branch.training


def test_shapes_recorded_on_every_node(example_model):
    _, model, inputs = example_model
    result = gt.rewrite(model, [], inputs)
    for region in result.tree.regions():
        if region.kind != "traced":
            continue
        for node in region.graph_module.graph.nodes:
            if node.op in ("placeholder", "call_module", "call_function", "call_method"):
                meta = tensor_meta(node)
                assert meta is not None, f"no shape on {node.format_node()}"
                assert len(meta.shape) >= 1 and meta.dtype.is_floating_point


def test_shape_the_model_rejects_quotes_its_message():
    model, _ = example("models/plain_cnn.py:PlainCNN")
    with pytest.raises(InputShapeError, match="rejects inputs of shape 2,5,32,32: .*channels"):
        gt.rewrite(model, [], (torch.randn(2, 5, 32, 32),))
