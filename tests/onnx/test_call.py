"""How the export calls a model: defaulted arguments, fx guards, keyword-heavy forwards, dicts.

The TorchScript exporter binds every defaulted forward parameter positionally; the export must
call the model with its inputs alone, drop fx guard nodes from a copy only, and name the
tensors of a mapping output (Hugging Face ``ModelOutput``) by their keys.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from graphtricks.onnx import export_pair, validate_pair
from graphtricks.onnx.eager import named_outputs, non_tensor_outputs
from graphtricks.onnx.torchscript import fx_guards


class GuardedAttention(nn.Module):
    """Like timm's ViT: an input-size assert, and defaulted non-tensor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        torch._assert(x.shape[2] == 8, "input width doesn't match model (8)")
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.drop(out)


def traced_guarded() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    concrete = {"attn_mask": None, "is_causal": False}  # what capture does with such defaults
    return torch.fx.symbolic_trace(GuardedAttention().eval(), concrete_args=concrete)


def test_fx_guards_and_defaulted_arguments_export_and_validate(tmp_path):
    model = traced_guarded()
    guards = len(fx_guards(model))
    assert guards == 3  # the size assert, and one per concrete argument
    x = (torch.randn(2, 5, 8),)
    result = export_pair(model, x, tmp_path)
    assert result.input_names == ("x",) and result.warnings == ()
    assert any("3 fx guard node(s)" in note for note in result.notes)
    assert len(fx_guards(model)) == guards  # the user's model keeps its guards
    with pytest.raises(AssertionError, match="width"):
        model(torch.randn(2, 5, 4))
    report = validate_pair(model, x, tmp_path, device="cpu", seeds=(0,))
    assert report.passed, report.summary()


def config_defaults(forward):
    """Like transformers' merge_with_config_defaults under another decorator: it cannot see a
    positional ``use_cache``, so it adds one by keyword."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        kwargs.setdefault("use_cache", True)
        return forward(self, *args, **kwargs)

    return wrapper


class ConfigDefaults(nn.Module):
    """A Hugging Face-like model: many defaulted keyword parameters, a ModelOutput-like dict."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)

    @config_defaults
    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None, **kwargs):
        hidden = self.embed(input_ids)
        cache = object() if use_cache else None
        return OrderedDict(last_hidden_state=hidden, cache=cache, pooled=(hidden.mean(1),))


def test_keyword_heavy_forward_exports_named_tensor_outputs(tmp_path):
    torch.manual_seed(0)
    model = ConfigDefaults()
    ids = (torch.randint(0, 50, (2, 6)),)
    result = export_pair(model, ids, tmp_path)
    assert result.input_names == ("input_ids",)
    assert result.output_names == ("last_hidden_state", "pooled")
    assert any("cache: object" in note for note in result.notes)
    report = validate_pair(model, ids, tmp_path, device="cpu", seeds=(0,))
    assert report.passed, report.summary()


def test_named_outputs_follow_keys_else_positions():
    a, b, c = torch.zeros(1), torch.ones(1), torch.ones(2)
    assert [n for n, _ in named_outputs(a)] == ["output"]
    assert [n for n, _ in named_outputs((a, (b, c)))] == ["output_0", "output_1", "output_2"]
    nested = OrderedDict(last_hidden_state=a, hidden_states=(b, c), attentions=None)
    assert [n for n, _ in named_outputs(nested)] == [
        "last_hidden_state", "hidden_states_0", "hidden_states_1",
    ]
    assert non_tensor_outputs(nested) == [] and non_tensor_outputs({"cache": object()}) == [
        "cache: object"
    ]


@pytest.mark.parametrize("name", ["BertModel", "GPT2Model"])
def test_hugging_face_models_export_and_validate(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    config = {
        "BertModel": transformers.BertConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            vocab_size=100,
        ),
        "GPT2Model": transformers.GPT2Config(
            n_embd=32, n_layer=1, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0
        ),
    }[name]
    torch.manual_seed(0)
    model = getattr(transformers, name)(config).eval()
    ids = (torch.randint(0, 100, (2, 7)),)
    result = export_pair(model, ids, tmp_path)
    assert result.input_names == ("input_ids",)
    assert result.output_names[0] == "last_hidden_state"
    report = validate_pair(model, ids, tmp_path, device="cpu", seeds=(0,))
    assert report.passed, report.summary()
