"""Layers that passes put into models (importable, so rewritten models load and export)."""

from graphtricks.layers.norm import ChannelLayerNorm, NormAct, channel_layer_norm

__all__ = ["ChannelLayerNorm", "LEAF_LAYERS", "NormAct", "channel_layer_norm"]

# graphtricks' own layers that every trace keeps as leaves, as it keeps PyTorch's: a model
# rewritten in one run and one re-captured later then have the same graph.
LEAF_LAYERS = (ChannelLayerNorm,)
