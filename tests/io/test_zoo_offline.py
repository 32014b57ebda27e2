"""Zoo specs never download (issue 15.7): torchvision builders built with networking disabled."""

from __future__ import annotations

import inspect
import socket
import urllib.request

import pytest

torchvision = pytest.importorskip("torchvision")

from graphtricks.io.specs import load_model  # noqa: E402

_ALL = torchvision.models.list_models()
# Builders that would fetch ImageNet backbone weights unless told not to (segmentation, detection).
_BACKBONED = [n for n in _ALL if "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(n)).parameters]
_SAMPLE = ["resnet18", "mobilenet_v3_small", "mnasnet0_5", "squeezenet1_0", "googlenet"]
# Too big to build in a quick run (hundreds of millions of parameters).
_HUGE = {"vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32", "regnet_y_32gf", "regnet_y_16gf"}


class NetworkUsed(AssertionError):
    pass


@pytest.fixture
def offline(monkeypatch):
    """Every way torchvision could fetch weights raises (cached files included)."""
    import torch.hub

    def refuse(*args, **kwargs):
        raise NetworkUsed(f"network used: {args[:1]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_every_backboned_builder_is_known():
    assert {"lraspp_mobilenet_v3_large", "deeplabv3_resnet50", "fcn_resnet50", "fasterrcnn_resnet50_fpn"} <= set(_BACKBONED)


@pytest.mark.parametrize("name", _BACKBONED + _SAMPLE)
def test_torchvision_builder_offline(offline, name):
    load_model(f"tv:{name}")


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in _ALL if n not in _BACKBONED + _SAMPLE])
def test_every_torchvision_builder_offline(offline, name):
    if name in _HUGE:
        pytest.skip("hundreds of millions of parameters: built by hand only")
    load_model(f"tv:{name}")


def test_timm_offline(offline):
    pytest.importorskip("timm")
    load_model("timm:resnet18")
