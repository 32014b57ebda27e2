"""What a module or a call *is*: one table per concept, read by capture, passes and export.

Dropout, norms, containers, view-like methods: each is written here once, so that the passes,
the dataflow analyses, the summary and the ONNX checks agree on what they look for.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphtricks.fxgraph.activations import zoo_activation_name
from graphtricks.layers import is_leaf_layer
from graphtricks.layers.norm import ChannelLayerNorm

__all__ = [
    "CONTAINERS",
    "DROPOUT_FUNCTIONS",
    "DROPOUT_MODULES",
    "NORM_FUNCTIONS",
    "NORM_TYPES",
    "PASS_THROUGH_FUNCTIONS",
    "PASS_THROUGH_MODULES",
    "VIEW_METHODS",
    "is_builtin_module",
]

CONTAINERS = (nn.ModuleList, nn.ModuleDict)

DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
DROPOUT_FUNCTIONS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.dropout, torch.feature_dropout, torch.alpha_dropout,
}

# Norms with a learnable scale γ: what initializers reset and residual branches end in.
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, ChannelLayerNorm)
# Functional norms by the name the summary reports them under.
NORM_FUNCTIONS = {
    F.batch_norm: "batch_norm", F.layer_norm: "layer_norm", F.group_norm: "group_norm",
    F.instance_norm: "instance_norm", F.rms_norm: "rms_norm", F.local_response_norm: "local_response_norm",
}

# Methods that only move or view values (a value passing through them is still the same value).
VIEW_METHODS = frozenset({
    "view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "contiguous", "expand", "to",
    "float", "half", "bfloat16", "type_as", "clone", "detach", "t",
})
PASS_THROUGH_MODULES = (nn.Flatten, nn.Identity, nn.Unflatten)
PASS_THROUGH_FUNCTIONS = frozenset({operator.getitem, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze})


def is_builtin_module(module: nn.Module) -> bool:
    """True for PyTorch's own layers (fx's default leaves), ``LEAF_LAYERS``, ``ZOO_LAYERS`` and other
    libraries' activation modules (``zoo_activation_name``); False for containers."""
    if isinstance(module, (nn.Sequential, fx.GraphModule)) or isinstance(module, CONTAINERS):
        return False  # adopted modules too (a ReLU given a graph with dropout is a GraphModule)
    if is_leaf_layer(module) or zoo_activation_name(module) is not None:
        return True
    name = type(module).__module__
    return name.startswith("torch.nn") or name.startswith("torch.ao.nn")
