"""Keyword inputs through export and validate (issue 15.3): a model rewritten with
``example_kwargs`` exports with ONNX inputs named after the keywords, and validates."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

import graphtricks as gt
from graphtricks.errors import GraphtricksError
from graphtricks.onnx import INFER_FILE, TRAIN_FILE
from tests.keyword_models import SPEC_DIR, KwOnly, Mixed

SPEC = f"{SPEC_DIR}:KwOnly"


def _kwargs():
    g = torch.Generator().manual_seed(0)
    # given out of order: the graph takes them in the forward's order
    return {"mask": (torch.rand(6, 16, generator=g) > 0.5).float(), "x": torch.randn(6, 8, generator=g)}


def _inputs(path) -> list[str]:
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    return [v.name for v in graph.input if v.name not in inits]


def _saved(tmp_path):
    result = gt.rewrite(KwOnly().eval(), [gt.InsertDropout(p=0.1)], example_kwargs=_kwargs())
    folder = tmp_path / "m"
    gt.save(result, folder, source={"spec": SPEC})
    return result, folder


def test_saved_folder_with_keyword_inputs_exports_and_validates(tmp_path):
    _, folder = _saved(tmp_path)
    exported = gt.export(folder)
    assert exported.input_names == ("x", "mask")
    assert _inputs(folder / TRAIN_FILE) == _inputs(folder / INFER_FILE) == ["x", "mask"]
    report = gt.validate(folder, device="cpu")
    assert report.passed, report.summary()


def test_rewrite_result_with_keyword_inputs_exports_and_validates(tmp_path):
    result = gt.rewrite(KwOnly().eval(), [gt.InsertDropout(p=0.1)], example_kwargs=_kwargs())
    exported = gt.export(result, tmp_path / "m", source={"spec": SPEC})
    assert exported.input_names == ("x", "mask")
    assert gt.validate(tmp_path / "m", device="cpu").passed


def test_module_with_positional_and_keyword_inputs(tmp_path):
    model = Mixed().eval()
    x, scale = torch.randn(2, 8), torch.full((2, 4), 3.0)
    exported = gt.export(model, tmp_path, (x,), example_kwargs={"scale": scale})
    assert exported.input_names == ("x", "scale")
    report = gt.validate(tmp_path, model, (x,), example_kwargs={"scale": scale}, device="cpu")
    assert report.passed, report.summary()


def test_keyword_only_module_is_refused_in_one_line(tmp_path):
    # an unrewritten keyword-only forward has no positions for the exporter to feed
    with pytest.raises(GraphtricksError, match="keyword-only") as info:
        gt.export(KwOnly().eval(), tmp_path, example_kwargs=_kwargs())
    assert "\n" not in str(info.value)


def _cli(*args: str):
    from typer.testing import CliRunner

    from graphtricks.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_exports_and_validates_a_folder_with_keyword_inputs(tmp_path):
    _, folder = _saved(tmp_path)
    r = _cli("export", str(folder), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout[r.stdout.index("{"):])["input_names"] == ["x", "mask"]
    r = _cli("validate", str(folder), "--device", "cpu")
    assert r.exit_code == 0, r.output


def test_cli_exports_a_spec_with_keyword_inputs(tmp_path):
    out = tmp_path / "m"
    r = _cli("export", SPEC, "--input", "x=6,8", "--input", "mask=6,16", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert _inputs(out / TRAIN_FILE) == ["x", "mask"]
    r = _cli("validate", str(out), "--device", "cpu")
    assert r.exit_code == 0, r.output


def test_bert_with_input_ids_and_attention_mask_exports_and_validates(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    kwargs = {"attention_mask": mask, "input_ids": ids}
    result = gt.rewrite(model, [gt.InsertDropout(p=0.1)], example_kwargs=kwargs)
    exported = gt.export(result.model, tmp_path, example_kwargs=result.example_kwargs)
    assert exported.input_names == ("input_ids", "attention_mask")
    report = gt.validate(tmp_path, result.model, example_kwargs=result.example_kwargs, device="cpu")
    assert report.passed, report.summary()
