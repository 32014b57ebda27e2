"""Layers that passes put into models (importable, so rewritten models load and export)."""

from graphtricks.layers.norm import ChannelLayerNorm, NormAct, channel_layer_norm

__all__ = ["ChannelLayerNorm", "NormAct", "channel_layer_norm"]
