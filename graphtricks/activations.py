"""Activations in every form fx records them: module, functional and method calls.

One table serves every pass that looks for nonlinearities (dropout after activations,
graph-aware initializer gains). Names are the ``torch.nn`` class names, so a functional
``F.relu`` and a module ``nn.ReLU`` select the same way.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATION_MODULES",
    "ACTIVATION_FUNCTIONS",
    "ACTIVATION_METHODS",
    "activation_name",
    "activation_kwargs",
    "normalise_activation_name",
]

ACTIVATION_MODULES: dict[type, str] = {
    cls: cls.__name__
    for cls in (
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
        nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Tanh, nn.Sigmoid,
        nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.GLU, nn.Threshold,
    )
}

ACTIVATION_FUNCTIONS: dict[object, str] = {
    F.relu: "ReLU", F.relu_: "ReLU", torch.relu: "ReLU", torch.relu_: "ReLU",
    F.relu6: "ReLU6",
    F.leaky_relu: "LeakyReLU", F.leaky_relu_: "LeakyReLU",
    F.prelu: "PReLU", torch.prelu: "PReLU",
    F.rrelu: "RReLU", F.rrelu_: "RReLU",
    F.elu: "ELU", F.elu_: "ELU",
    F.selu: "SELU", torch.selu: "SELU", torch.selu_: "SELU",
    F.celu: "CELU", torch.celu: "CELU",
    F.gelu: "GELU",
    F.silu: "SiLU",
    F.mish: "Mish",
    F.hardswish: "Hardswish",
    F.hardsigmoid: "Hardsigmoid",
    F.hardtanh: "Hardtanh", F.hardtanh_: "Hardtanh",
    torch.tanh: "Tanh", torch.tanh_: "Tanh", F.tanh: "Tanh",
    torch.sigmoid: "Sigmoid", torch.sigmoid_: "Sigmoid", F.sigmoid: "Sigmoid",
    F.softplus: "Softplus",
    F.softsign: "Softsign",
    F.tanhshrink: "Tanhshrink",
    F.logsigmoid: "LogSigmoid",
    F.glu: "GLU",
    F.threshold: "Threshold",
}

ACTIVATION_METHODS: dict[str, str] = {
    "relu": "ReLU", "relu_": "ReLU",
    "sigmoid": "Sigmoid", "sigmoid_": "Sigmoid",
    "tanh": "Tanh", "tanh_": "Tanh",
    "selu": "SELU", "selu_": "SELU",
    "celu": "CELU", "celu_": "CELU",
    "prelu": "PReLU",
}

_NAMES = {name.lower(): name for name in ACTIVATION_MODULES.values()}


def normalise_activation_name(name: str) -> str:
    """``"relu"``, ``"ReLU"`` or ``"nn.ReLU"`` → ``"ReLU"``.

    Raises:
        ValueError: not an activation this table knows (the message lists the valid ones).
    """
    key = name.strip().lower().removeprefix("nn.").removeprefix("torch.nn.")
    if key not in _NAMES:
        raise ValueError(f"unknown activation {name!r}; choose from {', '.join(sorted(_NAMES.values()))}")
    return _NAMES[key]


def activation_name(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """The activation a node computes (``"ReLU"``, ``"GELU"``, …), or None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        for cls, name in ACTIVATION_MODULES.items():
            if type(module) is cls or (isinstance(module, cls) and cls is not nn.Module):
                return name
        return None
    if node.op == "call_function":
        return ACTIVATION_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return ACTIVATION_METHODS.get(node.target)
    return None


def activation_kwargs(node: fx.Node, gm: fx.GraphModule) -> dict:
    """The parameters of an activation that change its gain (LeakyReLU's slope), best effort."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.LeakyReLU):
            return {"negative_slope": module.negative_slope}
        return {}
    if node.target in (F.leaky_relu, F.leaky_relu_):
        slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
        return {"negative_slope": slope} if isinstance(slope, (int, float)) else {}
    return {}
