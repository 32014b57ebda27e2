"""Activation checkpointing survives a rewrite: checkpointed blocks run again in backward, as before.

fx would trace through ``torch.utils.checkpoint.checkpoint``; a region's tracer records it (and
timm's ``checkpoint_seq``) as a call instead, with the block passed as the module itself, and the
block becomes a region of its own. Each test counts the calls of a block in one forward and
backward, in the original and in the rewritten model.
"""

from __future__ import annotations

import functools
import io
import warnings
from collections import Counter

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.utils.checkpoint import checkpoint

import graphtricks as gt


def _rewrite(model, inputs, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gt.rewrite(model, [gt.InsertDropout(p=0.1)], inputs, **kwargs)


def _calls(model: nn.Module, names: list[str], run) -> Counter:
    """Calls of each named module during ``run(model)`` (forward and backward, train mode)."""
    counts: Counter = Counter()
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: counts.update([n])) for n in names]
    try:
        model.train()
        run(model)
    finally:
        for handle in handles:
            handle.remove()
    return counts


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(8, 8), nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(x)) + x


class _Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.act = nn.Linear(8, 8), nn.GELU()
        self.block = _Block()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = checkpoint(self.block, self.act(self.stem(x)), use_reentrant=False)
        h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=False)  # by attribute, too
        return self.head(h)


def test_a_users_checkpoint_call_stays_a_call_of_the_block():
    torch.manual_seed(0)
    model, x = _Checkpointed(), torch.randn(3, 8)
    result = _rewrite(model, (x,))
    rewritten = result.model
    backward = lambda m: m(x).sum().backward()  # noqa: E731
    assert _calls(model, ["block"], backward)["block"] == 4  # two checkpointed calls, each run twice
    assert _calls(rewritten, ["block"], backward)["block"] == 4
    assert rewritten.code.count("checkpoint(block") == 2
    assert "act_dropout" in rewritten.block.code  # the block's own edits, in its own region
    assert not result.report.inlined


def test_a_pickled_checkpointing_model_keeps_checkpointing_and_fx_keeps_working():
    torch.manual_seed(0)
    model, x = _Checkpointed(), torch.randn(3, 8)
    rewritten = _rewrite(model, (x,)).model
    buffer = io.BytesIO()
    torch.save(rewritten, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert _calls(loaded, ["block"], lambda m: m(x).sum().backward())["block"] == 4
    fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))  # fx's own tracing is not broken by what ran


def test_timm_resnet_set_grad_checkpointing_before_the_rewrite():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    result = _rewrite(model, (x,))
    names = ["layer1.0", "layer4.0"]
    backward = lambda m: m(x).sum().backward()  # noqa: E731
    want = _calls(model, names, backward)
    assert want == {"layer1.0": 2, "layer4.0": 2}
    assert _calls(result.model, names, backward) == want
    assert "dropout" in result.model.layer1[0].code  # the blocks still get the technique


def test_timm_convnext_set_grad_checkpointing_after_the_rewrite():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    rewritten = _rewrite(model, (x,)).model
    for m in (model, rewritten):
        m.set_grad_checkpointing(True)
    names = ["stages.0.blocks.0", "stages.3.blocks.1"]
    backward = lambda m: m(x).sum().backward()  # noqa: E731
    want = _calls(model, names, backward)
    assert want == dict.fromkeys(names, 2)
    assert _calls(rewritten, names, backward) == want


@pytest.mark.parametrize("when", ["before", "after"])
def test_hugging_face_gradient_checkpointing(when):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    ids = torch.randint(0, 50, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if when == "before":
            model.gradient_checkpointing_enable()
        rewritten = _rewrite(model, (ids,)).model
        if when == "after":
            for m in (model, rewritten):
                m.gradient_checkpointing_enable()
        # HF checkpoints the layer's forward (its own hooks stay outside): its children run twice.
        names = ["encoder.layer.0", "encoder.layer.0.intermediate", "encoder.layer.1.output"]
        backward = lambda m: m(ids).last_hidden_state.sum().backward()  # noqa: E731
        want = _calls(model, names, backward)
        got = _calls(rewritten, names, backward)
    assert want["encoder.layer.0.intermediate"] == 2
    assert got == want
    assert "dropout" in rewritten.get_submodule("encoder.layer.0.intermediate").code


class _PartialCheckpoint(nn.Module):
    """Checkpoints through a partial and a closure, as Hugging Face's layers do: fx cannot record it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.grad_ckpt = True
        self.ckpt = functools.partial(checkpoint, use_reentrant=False)

    def forward(self, x):
        def run(h):
            return torch.relu(self.fc(h))

        return self.ckpt(run, x) if self.grad_ckpt else run(x)


def test_a_checkpoint_a_graph_cannot_call_keeps_its_caller_as_written():
    torch.manual_seed(0)
    model = nn.Sequential(_PartialCheckpoint(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    result = _rewrite(model, (x,))
    region = next(r for r in result.tree.regions() if r.path == "0")
    assert region.kind == "opaque" and "checkpoint" in region.reason
    assert _calls(result.model, ["0.fc"], lambda m: m(x).sum().backward())["0.fc"] == 2


def test_checkpointing_turned_on_where_it_cannot_be_recorded_is_refused_by_name():
    torch.manual_seed(0)
    inner = _PartialCheckpoint()
    inner.grad_ckpt = False
    model, x = nn.Sequential(inner, nn.Linear(4, 2)), torch.randn(3, 4)
    rewritten = _rewrite(model, (x,)).model
    assert "relu_dropout" in rewritten[0].code
    rewritten[0].grad_ckpt = True
    with pytest.raises(gt.GraphtricksError, match=r"_PartialCheckpoint.grad_ckpt was False .* checkpoints through"):
        rewritten.train()(x)
