"""Validation sees what deployment sends (issue 24.4): a BERT's masks padded, its graphs
validated on them, and the padded positions changing what the exported graph computes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import graphtricks as gt
from graphtricks.io.inputs import make_keyword_inputs, value_limits
from graphtricks.onnx import INFER_FILE

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    kwargs = make_keyword_inputs({"input_ids": "3,12", "attention_mask": "3,12", "token_type_ids": "3,12"},
                                 "int64", high=100, highs=value_limits(model))
    result = gt.rewrite(model, [gt.InsertDropout(p=0.1)], example_kwargs=kwargs)
    out = tmp_path_factory.mktemp("bert")
    gt.export(result.model, out, example_kwargs=result.example_kwargs)
    return result, out


def test_bert_validates_on_padded_masks_named_so(bert):
    result, out = bert
    mask = result.example_kwargs["attention_mask"]
    assert mask[0].eq(1).all() and mask[1:].eq(0).any(1).all()  # the example itself is padded
    report = gt.validate(out, result.model, example_kwargs=result.example_kwargs, device="cpu")
    assert report.passed, report.summary()
    sets = {c.inputs for c in report.checks if c.name == "infer_vs_eager"}
    assert sets == {f"seed={s},padded=attention_mask" for s in (0, 1, 2)}
    assert any("padded attention_mask checked" in n for n in report.notes)


def test_users_input_sets_are_used_as_given(bert):
    result, out = bert
    ids, mask, types = (result.example_kwargs[k] for k in ("input_ids", "attention_mask", "token_type_ids"))
    unpadded = (ids, torch.ones_like(mask), types)
    report = gt.validate(out, result.model, example_kwargs=result.example_kwargs, device="cpu", inputs=[unpadded])
    assert report.passed, report.summary()
    assert "extra_inputs[0]" in {c.inputs for c in report.checks if c.name == "infer_vs_eager"}


def test_padded_positions_change_the_exported_graphs_outputs(bert):
    result, out = bert
    feed = {k: v.numpy() for k, v in result.example_kwargs.items()}
    session = ort.InferenceSession(str(out / INFER_FILE), providers=["CPUExecutionProvider"])
    padded = session.run(None, feed)[0]
    unpadded = session.run(None, dict(feed, attention_mask=np.ones_like(feed["attention_mask"])))[0]
    lengths = feed["attention_mask"].sum(1)
    # the unpadded row is the same either way; a padded row's tokens no longer attend to the padding
    np.testing.assert_allclose(padded[0], unpadded[0], rtol=1e-5, atol=1e-5)
    for row in (1, 2):  # the same graph and inputs but the mask: any change beyond float noise is the mask's
        n = int(lengths[row])
        assert n < padded.shape[1]
        assert np.abs(padded[row, :n] - unpadded[row, :n]).max() > 1e-5, f"row {row} ignores its mask"
