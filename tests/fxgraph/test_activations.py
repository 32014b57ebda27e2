"""Activation modules of other libraries are activations, whole: never opened up by a trace."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import graphtricks as gt
from graphtricks.fxgraph.activations import zoo_activation_name


class NewGELUActivation(nn.Module):  # the shape of transformers' GELU tanh approximation, written out
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * torch.pow(x, 3.0))))


class SwiGLUActivation(nn.Module):  # a gated unit is no activation of the table, whatever its name
    def forward(self, x):
        a, b = x.chunk(2, -1)
        return a * torch.sigmoid(b)


class ScaledGELUActivation(nn.Module):  # learnable: not a plain activation
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.scale * torch.nn.functional.gelu(x)


def test_zoo_activation_names_come_from_the_class_name_of_parameter_free_modules():
    assert zoo_activation_name(NewGELUActivation()) == "GELU"
    assert zoo_activation_name(SwiGLUActivation()) is None
    assert zoo_activation_name(ScaledGELUActivation()) is None
    assert zoo_activation_name(nn.ReLU()) is None  # PyTorch's own are in ACTIVATION_MODULES
    timm_activations = pytest.importorskip("timm.layers.activations")
    assert zoo_activation_name(timm_activations.Swish()) == "SiLU"
    assert zoo_activation_name(timm_activations.GELUTanh()) == "GELU"
    assert zoo_activation_name(timm_activations.HardSwish()) == "Hardswish"
    transformers_activations = pytest.importorskip("transformers.activations")
    assert zoo_activation_name(transformers_activations.NewGELUActivation()) == "GELU"
    assert zoo_activation_name(transformers_activations.QuickGELUActivation()) == "GELU"


def _mlp():
    return nn.Sequential(nn.Linear(8, 16), NewGELUActivation(), nn.Linear(16, 4))


def test_dropout_goes_after_a_zoo_activation_not_inside_its_formula():
    model, x = _mlp(), torch.randn(3, 8)
    result = gt.rewrite(model, [gt.InsertDropout(0.5)], (x,))
    assert [(c.where, c.what) for c in result.report.changes] == [("1", "Dropout(p=0.5, inplace=False) after GELU")]
    torch.testing.assert_close(result.model.eval()(x), model.eval()(x))


def test_init_reads_the_gain_of_a_zoo_activation():
    result = gt.rewrite(_mlp(), [gt.Initialize("auto")], (torch.randn(3, 8),))
    first = next(c for c in result.report.changes if c.where == "0")
    assert first.details["nonlinearity"] == "GELU"


def test_gpt2_gets_dropout_after_its_gelu_module():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = gt.rewrite(model, [gt.InsertDropout(0.1)], (torch.randint(0, 50, (2, 8)),))
    assert [c.where for c in result.report.changes] == ["h.0.mlp.act"]
