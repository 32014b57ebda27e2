"""init on Hugging Face layers (issue 15.4): transformers Conv1D is a Linear; tied weights set once."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import graphtricks as gt

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def _changes(result):
    return {c.where: c for c in result.report.changes}


def test_conv1d_is_a_linear_with_fans_from_its_transposed_weight():
    model = nn.Sequential(Conv1D(16, 8), nn.ReLU(), Conv1D(4, 16))  # Conv1D(nf=out, nx=in): weight (in, out)
    result = gt.rewrite(model, [gt.Initialize("auto")], (torch.randn(2, 8),))
    changes = _changes(result)
    first, last = changes["0"].details, changes["2"].details
    assert (first["fan_in"], first["fan_out"]) == (8, 16) and first["nonlinearity"] == "ReLU"
    assert first["initializer"] == "he-normal" and first["std"] == pytest.approx(math.sqrt(2 / 8))
    assert (last["fan_in"], last["fan_out"]) == (16, 4) and last["initializer"] == "xavier-uniform"
    assert isinstance(result.model.get_submodule("0"), Conv1D)  # kept as a layer, not traced through


def test_gpt2_tied_embedding_is_set_once_and_every_name_reported():
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    result = gt.rewrite(model, [gt.Initialize("auto")], (torch.randint(0, 100, (2, 8)),))
    rm = result.model
    assert rm.transformer.wte.weight is rm.lm_head.weight
    changes = _changes(result)
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                 "transformer.h.0.mlp.c_proj"):
        assert name in changes, name
    c_attn = changes["transformer.h.0.attn.c_attn"].details
    assert (c_attn["fan_in"], c_attn["fan_out"]) == (32, 96)
    tied = [c for c in result.report.changes if "transformer.wte.weight" in c.details.get("shared_with", ())
            or "transformer.wte.weight" in c.details.get("params", ())]
    assert len(tied) == 1 and "lm_head.weight" in tied[0].details["params"] + tied[0].details["shared_with"]
    assert "transformer.wte.weight" in tied[0].what
