"""Issue 17, pretrained weights: hf:PATH for a save_pretrained folder, --pretrained through each library's cache."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from typer.testing import CliRunner

from graphtricks.cli import app
from graphtricks.errors import SpecError
from graphtricks.io.specs import load_model

runner = CliRunner()


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """No network: a download raises as it would offline; torch's cache is an empty folder of the test's."""
    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError(f"offline (test): {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_a_save_pretrained_folder_is_a_spec(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config)
    model.save_pretrained(tmp_path / "bert")
    loaded = load_model(f"hf:{tmp_path / 'bert'}")
    assert type(loaded).__name__ == "BertForMaskedLM"  # the class its config names, not the bare encoder
    want = model.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in loaded.state_dict().items())
    result = runner.invoke(app, ["rewrite", f"hf:{tmp_path / 'bert'}", "--input-shape", "2,8", "--dropout", "0.1",
                                 "--dry-run"])
    assert result.exit_code == 0, result.output
    with pytest.raises(SpecError, match="no config.json"):
        load_model(f"hf:{tmp_path}")


def test_pretrained_torchvision_weights_come_from_torch_cache(offline):
    torchvision = pytest.importorskip("torchvision")
    url = torchvision.models.get_model_weights("squeezenet1_1").DEFAULT.url
    torch.manual_seed(1)
    published = torchvision.models.squeezenet1_1().state_dict()
    offline.mkdir(parents=True)
    torch.save(published, offline / url.rsplit("/", 1)[1])
    model = load_model("tv:squeezenet1_1", pretrained=True)
    assert all(torch.equal(t, published[k]) for k, t in model.state_dict().items())


def test_pretrained_offline_and_not_cached_is_one_line(offline):
    pytest.importorskip("torchvision")
    result = runner.invoke(app, ["inspect", "tv:squeezenet1_1", "--input-shape", "1,3,32,32", "--pretrained"])
    assert result.exit_code == 1, result.output
    assert "cannot load pretrained weights for tv:squeezenet1_1" in result.output and "--pretrained" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_pretrained_needs_a_zoo_spec(tmp_path):
    from tests.conftest import ROOT

    result = runner.invoke(app, ["rewrite", f"{ROOT}/models/mlp.py:MLP", "--input-shape", "2,32", "--pretrained",
                                 "--dropout", "0.1", "--dry-run"])
    assert result.exit_code == 1 and "--pretrained applies to tv:, timm: and hf:" in result.output, result.output
