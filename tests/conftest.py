"""Shared fixtures: the example models of models/, loaded by spec like a user would."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from graphtricks.io.specs import load_model
from graphtricks.io.inputs import make_example_inputs

ROOT = Path(__file__).resolve().parent.parent

# spec → example input shape; every model shipped in models/ is listed here.
EXAMPLE_MODELS = {
    "models/plain_cnn.py:PlainCNN": [(4, 3, 32, 32)],
    "models/mlp.py:MLP": [(8, 32)],
    "models/encoder_block.py:TinyEncoder": [(2, 6, 32)],
    "models/functional_acts.py:FunctionalActs": [(2, 3, 16, 16)],
    "models/control_flow.py:DataDependent": [(2, 3, 16, 16)],
}
if (ROOT / "models" / "plain_vgg.py").is_file():
    EXAMPLE_MODELS["models/plain_vgg.py:PlainVGG"] = [(2, 3, 32, 32)]


def example(spec: str):
    """(model in eval mode, example inputs) for an example spec, with fixed seeds."""
    torch.manual_seed(0)
    model = load_model(str(ROOT / spec.split(":")[0]) + ":" + spec.split(":")[1]).eval()
    return model, make_example_inputs(EXAMPLE_MODELS[spec], seed=1)


@pytest.fixture(params=sorted(EXAMPLE_MODELS), ids=lambda s: s.split(":")[1])
def example_model(request):
    return (request.param, *example(request.param))


@pytest.fixture(autouse=True)
def _quiet_nochange():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        yield
