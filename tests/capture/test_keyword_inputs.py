"""Keyword inputs (issue 15.3): rewrite, passes, save/load with ``example_kwargs``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphtricks as gt
from graphtricks.errors import InputShapeError


from tests.keyword_models import SPEC_DIR, KwOnly, Mixed



def _bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                     intermediate_size=128, vocab_size=100, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def _kw_inputs():
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(4, 8, generator=g), "mask": (torch.rand(4, 16, generator=g) > 0.5).float()}


def test_keyword_only_forward_rewrites():
    model = KwOnly().eval()
    kwargs = _kw_inputs()
    result = gt.rewrite(model, [gt.InsertDropout(p=0.1)], example_kwargs=kwargs)
    assert result.report.changes
    assert result.example_inputs == () and set(result.example_kwargs) == {"x", "mask"}
    rm = result.model.eval()
    torch.testing.assert_close(rm(**kwargs), model(**kwargs))
    assert result.tree.root.kind == "traced"


def test_keyword_inputs_reach_shapes():
    result = gt.rewrite(KwOnly().eval(), [gt.InsertDropout(p=0.1)], example_kwargs=_kw_inputs())
    gm = result.tree.root.graph_module
    metas = [n.meta.get("tensor_meta") for n in gm.graph.nodes if n.op == "call_module"]
    assert metas and all(m is not None for m in metas)


def test_positional_and_keyword_inputs():
    model = Mixed().eval()
    x, scale = torch.randn(2, 8), torch.full((2, 4), 3.0)
    result = gt.rewrite(model, [gt.InsertDropout(p=0.1)], (x,), example_kwargs={"scale": scale})
    torch.testing.assert_close(result.model.eval()(x, scale=scale), model(x, scale=scale))


def test_omitted_keyword_is_named_in_one_line():
    result = gt.rewrite(KwOnly().eval(), [gt.InsertDropout(p=0.1)], example_kwargs=_kw_inputs())
    with pytest.raises(InputShapeError, match="'mask' is missing"):
        result.model.eval()(x=torch.randn(4, 8))


def test_unknown_keyword_is_an_input_error():
    with pytest.raises(InputShapeError, match="'y'"):
        gt.rewrite(KwOnly().eval(), [gt.InsertDropout(p=0.1)], example_kwargs={"x": torch.randn(4, 8), "y": torch.randn(4, 8)})


def test_no_inputs_at_all_is_an_input_error():
    with pytest.raises(InputShapeError):
        gt.rewrite(KwOnly().eval(), [gt.InsertDropout(p=0.1)], example_inputs=())


def test_bn_to_ln_measures_drift_with_keywords():
    # bn_to_ln measures its drift by a probe forward: it needs the keyword inputs too.
    result = gt.rewrite(KwOnly().eval(), [gt.BatchNormToLayerNorm()], example_kwargs=_kw_inputs())
    assert any(c.pass_name == "bn_to_ln" for c in result.report.changes)


def test_residual_measures_blocks_with_keywords():
    class Opaque(nn.Module):  # mode-dependent root: its children are measured by a probe forward
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

        def forward(self, *, x):
            return self.body(x) if self.training else self.body(x) * 1.0

    result = gt.rewrite(Opaque().eval(), [gt.AddResidual(["body.0"])], example_kwargs={"x": torch.randn(2, 8)})
    assert result.report.changes


def test_bert_with_input_ids_and_attention_mask():
    model = _bert()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    kwargs = {"input_ids": ids, "attention_mask": mask}
    result = gt.rewrite(model, [gt.InsertDropout(p=0.1)], example_kwargs=kwargs)
    assert result.report.changes
    want = model(**kwargs).last_hidden_state
    got = result.model.eval()(**kwargs)
    got = got.last_hidden_state if hasattr(got, "last_hidden_state") else got[0]
    torch.testing.assert_close(got, want)


# -- saved with the folder ------------------------------------------------------------------
SPEC = f"{SPEC_DIR}:KwOnly"


def test_folder_keeps_keyword_inputs_and_load_replays_them(tmp_path):
    from graphtricks.io.folder import load_saved
    from graphtricks.io.recipe import read_recipe

    kwargs = _kw_inputs()
    model = KwOnly().eval()
    result = gt.rewrite(model, [gt.InsertDropout(p=0.1), gt.BatchNormToLayerNorm()], example_kwargs=kwargs)
    gt.save(result, tmp_path / "m", source={"spec": SPEC})
    source = read_recipe(tmp_path / "m" / "recipe.toml").source
    assert source["input_kwargs"] == {"x": "4,8:float32", "mask": "4,16:float32"}
    saved = load_saved(tmp_path / "m")
    assert saved.example_inputs == () and list(saved.example_kwargs) == ["x", "mask"]
    torch.testing.assert_close(saved.example_kwargs["mask"], kwargs["mask"])
    torch.testing.assert_close(saved.model.eval()(**kwargs), result.model.eval()(**kwargs))


def test_folder_without_inputs_file_rebuilds_keywords_from_the_recipe(tmp_path):
    result = gt.rewrite(KwOnly().eval(), [gt.InsertDropout(p=0.1)], example_kwargs=_kw_inputs())
    gt.save(result, tmp_path / "m", source={"spec": SPEC})
    (tmp_path / "m" / "example_inputs.safetensors").unlink()
    kwargs = _kw_inputs()
    torch.testing.assert_close(gt.load(tmp_path / "m").eval()(**kwargs), result.model.eval()(**kwargs))


def test_old_folder_with_positional_inputs_still_loads(tmp_path):
    from safetensors.torch import load_file

    x = torch.randn(2, 8)
    result = gt.rewrite(Mixed().eval(), [gt.InsertDropout(p=0.1)], (x,))
    gt.save(result, tmp_path / "m", source={"spec": f"{SPEC_DIR}:Mixed"})
    assert set(load_file(str(tmp_path / "m" / "example_inputs.safetensors"))) == {"input0"}
    torch.testing.assert_close(gt.load(tmp_path / "m").eval()(x), result.model.eval()(x))


# -- command line ---------------------------------------------------------------------------
def _cli(*args: str):
    from typer.testing import CliRunner

    from graphtricks.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_rewrites_and_inspects_with_keyword_inputs(tmp_path):
    out = tmp_path / "m"
    r = _cli("rewrite", SPEC, "--input", "x=4,8", "--input", "mask=4,16:float32", "--dropout", "0.1", "--out", str(out))
    assert r.exit_code == 0, r.output
    from graphtricks.io.folder import load_saved

    saved = load_saved(out)
    assert {k: tuple(v.shape) for k, v in saved.example_kwargs.items()} == {"x": (4, 8), "mask": (4, 16)}
    r = _cli("inspect", SPEC, "--input", "x=4,8", "--json")
    assert r.exit_code == 0, r.output
    r = _cli("inspect", str(out), "--json")  # a saved folder's own keyword inputs
    assert r.exit_code == 0, r.output


def test_cli_keyword_and_positional_inputs_together(tmp_path):
    r = _cli("rewrite", f"{SPEC_DIR}:Mixed", "--input-shape", "2,8", "--input", "scale=2,4", "--dropout", "0.1",
             "--dry-run")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("value", ["x", "x=", "=4,8", "x=4x8", "x=4,8:complex", "1x=4,8", "x=4,8;2,3"])
def test_cli_malformed_keyword_input_is_a_usage_error(value):
    r = _cli("rewrite", SPEC, "--input", value, "--dry-run")
    assert r.exit_code == 2, r.output


def test_cli_keyword_input_given_twice_is_a_usage_error():
    r = _cli("inspect", SPEC, "--input", "x=4,8", "--input", "x=4,8")
    assert r.exit_code == 2 and "twice" in r.output, r.output


# -- positional order for exporters -----------------------------------------------------------
def test_keyword_inputs_in_positional_order_for_export():
    from graphtricks.io.inputs import positional_inputs

    kwargs = _kw_inputs()
    result = gt.rewrite(KwOnly().eval(), [gt.InsertDropout(p=0.1)], example_kwargs={"mask": kwargs["mask"], "x": kwargs["x"]})
    args, names = positional_inputs(result.model.forward, (), result.example_kwargs)
    assert names == ["x", "mask"]
    torch.testing.assert_close(result.model.eval()(*args), result.model.eval()(**kwargs))
    bert = _bert()
    ids = torch.randint(0, 100, (2, 12))
    args, names = positional_inputs(bert.forward, (), {"attention_mask": torch.ones_like(ids), "input_ids": ids})
    assert names == ["input_ids", "attention_mask"] and args[0] is ids
    with pytest.raises(InputShapeError, match="position_ids"):
        positional_inputs(bert.forward, (), {"input_ids": ids, "position_ids": ids})
    with pytest.raises(InputShapeError, match="keyword-only"):
        positional_inputs(KwOnly().forward, (), kwargs)
