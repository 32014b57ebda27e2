"""Layers that passes put into models (importable, so rewritten models load and export)."""

from graphtricks.layers.norm import ChannelLayerNorm, NormAct, channel_layer_norm

__all__ = ["ChannelLayerNorm", "LEAF_LAYERS", "ZOO_LAYERS", "NormAct", "channel_layer_norm", "is_leaf_layer", "is_zoo_linear"]

# graphtricks' own layers that every trace keeps as leaves, as it keeps PyTorch's: a model
# rewritten in one run and one re-captured later then have the same graph.
LEAF_LAYERS = (ChannelLayerNorm,)

# Layers of the model zoos that are what PyTorch's are (by qualified class name: the zoos are
# optional), kept as leaves like PyTorch's: transformers' Conv1D is a Linear with its weight
# stored transposed, (in, out).
ZOO_LAYERS = {"transformers.pytorch_utils.Conv1D": "linear-transposed"}


def _qualname(module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def is_leaf_layer(module) -> bool:
    """True for graphtricks' own layers and the zoo layers of ``ZOO_LAYERS``."""
    return isinstance(module, LEAF_LAYERS) or _qualname(module) in ZOO_LAYERS


def is_zoo_linear(module) -> bool:
    """True for a zoo layer that is a Linear with a transposed weight (transformers ``Conv1D``)."""
    return ZOO_LAYERS.get(_qualname(module)) == "linear-transposed"
