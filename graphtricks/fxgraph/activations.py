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

from graphtricks.fxgraph.lookup import submodule

__all__ = [
    "ACTIVATION_MODULES",
    "ACTIVATION_FUNCTIONS",
    "ACTIVATION_METHODS",
    "activation_name",
    "module_activation_name",
    "activation_kwargs",
    "zoo_activation_name",
    "normalise_activation_name",
    "ACTIVATION_INIT",
    "activation_init",
    "module_activation_kwargs",
    "node_activation_kwargs",
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
    F.rrelu: "RReLU", F.rrelu_: "RReLU", torch.rrelu: "RReLU", torch.rrelu_: "RReLU",
    F.elu: "ELU", F.elu_: "ELU",
    F.selu: "SELU", torch.selu: "SELU", torch.selu_: "SELU",
    F.celu: "CELU", F.celu_: "CELU", torch.celu: "CELU", torch.celu_: "CELU",
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
    F.threshold: "Threshold", F.threshold_: "Threshold", torch.threshold: "Threshold", torch.threshold_: "Threshold",
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


# Activation modules of other libraries, by class name: transformers' ``NewGELUActivation``
# (GELU's tanh approximation written out), ``GELUActivation``, ``QuickGELUActivation``,
# ``SiLUActivation``, timm's ``GELUTanh``, ``Swish``, ``HardSwish``... Traced through, their
# inner ops (a ``tanh`` inside GELU) look like activations of their own: kept whole instead.
_ZOO_ALIASES = {"swish": "SiLU", "gelutanh": "GELU", "quickgelu": "GELU", "hardswishme": "Hardswish"}
_ZOO_AFFIXES = (("new", "fast", "quick", "accurate", "pytorch", "approximate"), ("activation", "act", "me", "tanh"))


def zoo_activation_name(module: nn.Module) -> str | None:
    """The activation a module from another library computes, told by its class name, or None.

    Only parameter-free modules without children qualify (a learnable or composite block is not
    an activation, whatever its name).
    """
    cls = type(module)
    if cls.__module__.startswith("torch.") or any(True for _ in module.children()) or any(True for _ in module.parameters(recurse=False)):
        return None
    key = cls.__name__.lower()
    if key in _ZOO_ALIASES:
        return _ZOO_ALIASES[key]
    prefixes, suffixes = _ZOO_AFFIXES
    for prefix in prefixes:
        key = key.removeprefix(prefix)
    for suffix in suffixes:
        stripped = key.removesuffix(suffix)
        if stripped in _NAMES or stripped in _ZOO_ALIASES:
            key = stripped
            break
    return _NAMES.get(key) or _ZOO_ALIASES.get(key)


def normalise_activation_name(name: str) -> str:
    """``"relu"``, ``"ReLU"`` or ``"nn.ReLU"`` → ``"ReLU"``.

    Raises:
        ValueError: not an activation this table knows (the message lists the valid ones).
    """
    key = name.strip().lower().removeprefix("nn.").removeprefix("torch.nn.")
    if key not in _NAMES:
        raise ValueError(f"unknown activation {name!r}; choose from {', '.join(sorted(_NAMES.values()))}")
    return _NAMES[key]


def module_activation_name(module: nn.Module) -> str | None:
    """The activation a module computes (PyTorch's, a subclass of one, or another library's), or None."""
    name = ACTIVATION_MODULES.get(type(module))
    if name is not None:
        return name
    for cls, name in ACTIVATION_MODULES.items():
        if isinstance(module, cls):
            return name
    return zoo_activation_name(module)


def activation_name(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """The activation a node computes (``"ReLU"``, ``"GELU"``, …), or None."""
    if node.op == "call_module":
        return module_activation_name(submodule(gm, node.target))
    if node.op == "call_function":
        return ACTIVATION_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return ACTIVATION_METHODS.get(node.target)
    return None


def activation_kwargs(node: fx.Node, gm: fx.GraphModule) -> dict:
    """The parameters of an activation that change its gain (LeakyReLU's slope), best effort."""
    if node.op == "call_module":
        module = submodule(gm, node.target)
        if isinstance(module, nn.LeakyReLU):
            return {"negative_slope": module.negative_slope}
        return {}
    if node.target in (F.leaky_relu, F.leaky_relu_):
        slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
        return {"negative_slope": slope} if isinstance(slope, (int, float)) else {}
    return {}


# -- initialisation ------------------------------------------------------------------------
# For graph-aware initializers: each activation's family ("he" for rectifiers, "xavier" for
# saturating or gating functions) and the ``nn.init.calculate_gain`` name of its gain.
# Rectifiers PyTorch has no gain for take ReLU's; those with a negative slope use leaky_relu's.
ACTIVATION_INIT: dict[str, tuple[str, str]] = {
    **{name: ("he", "relu") for name in (
        "ReLU", "ReLU6", "ELU", "CELU", "GELU", "SiLU", "Mish", "Hardswish", "Softplus", "Threshold")},
    **{name: ("he", "leaky_relu") for name in ("LeakyReLU", "PReLU", "RReLU")},
    "SELU": ("he", "selu"),
    "Tanh": ("xavier", "tanh"),
    **{name: ("xavier", "linear") for name in ("Hardtanh", "Softsign", "Tanhshrink", "GLU")},
    **{name: ("xavier", "sigmoid") for name in ("Sigmoid", "Hardsigmoid", "LogSigmoid")},
}


def activation_init(name: str, kwargs: dict | None = None) -> tuple[str, float]:
    """(family, gain) of an activation: ``("he", 1.414…)`` for ReLU, ``("xavier", 5/3)`` for Tanh.

    Args:
        name: an activation name from this table (``"LeakyReLU"``).
        kwargs: its gain parameters (``{"negative_slope": 0.2}``), as from ``node_activation_kwargs``.

    Example:
        >>> activation_init("LeakyReLU", {"negative_slope": 0.2})
        ('he', 1.3867504905630728)
    """
    family, gain_name = ACTIVATION_INIT.get(name, ("xavier", "linear"))
    slope = (kwargs or {}).get("negative_slope")
    if gain_name == "leaky_relu":
        return family, nn.init.calculate_gain("leaky_relu", 0.01 if slope is None else slope)
    return family, nn.init.calculate_gain(gain_name)


def module_activation_kwargs(module: nn.Module) -> dict:
    """The gain parameters of an activation module: LeakyReLU's slope, PReLU's mean learnt slope,
    RReLU's mean random slope."""
    if isinstance(module, nn.LeakyReLU):
        return {"negative_slope": float(module.negative_slope)}
    if isinstance(module, nn.PReLU) and module.weight.device.type != "meta":
        return {"negative_slope": float(module.weight.detach().float().mean())}
    if isinstance(module, nn.RReLU):
        return {"negative_slope": (module.lower + module.upper) / 2}
    return {}


def node_activation_kwargs(node: fx.Node, gm: fx.GraphModule) -> dict:
    """The gain parameters of an activation node in any form (module, functional, method)."""
    if node.op == "call_module":
        return module_activation_kwargs(submodule(gm, node.target))
    if node.op == "call_function" and node.target in (F.rrelu, F.rrelu_):
        args = {"lower": 1.0 / 8, "upper": 1.0 / 3, **dict(zip(("lower", "upper"), node.args[1:3])), **node.kwargs}
        if isinstance(args["lower"], (int, float)) and isinstance(args["upper"], (int, float)):
            return {"negative_slope": (args["lower"] + args["upper"]) / 2}
        return {}
    if node.target in (F.prelu, torch.prelu, "prelu"):
        return {"negative_slope": 0.25}  # the slope is a tensor in the graph; PyTorch's default
    return activation_kwargs(node, gm)
