"""Normalisation layers that swap in for BatchNorm: a channel LayerNorm and a norm + act block.

``ChannelLayerNorm`` normalises each sample and position of an ``(N, C, *)`` tensor over its
channels (the ConvNeXt ``LayerNorm2d`` form) and keeps the constructor of ``nn.LayerNorm``.
It swaps channels last, runs ``F.layer_norm`` and swaps them back, so it exports to ONNX as
``Transpose → LayerNormalization → Transpose`` (opset ≥ 17).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ChannelLayerNorm", "NormAct", "channel_layer_norm"]


def channel_layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """Layer-normalise ``x`` of shape ``(N, C, *)`` over ``C`` at every sample and position.

    Args:
        x: a tensor with channels in dimension 1 (any rank ≥ 2).
        weight: per-channel scale of shape ``(C,)``, or None.
        bias: per-channel shift of shape ``(C,)``, or None.
        eps: added to the variance.

    Returns:
        A tensor of the shape of ``x``.

    Example:
        >>> y = channel_layer_norm(torch.randn(2, 8, 4, 4), eps=1e-6)
    """
    # Swapping C with the last dim (not movedim) exports to ONNX with valid, non-negative perms.
    return F.layer_norm(x.transpose(1, -1), (x.shape[1],), weight, bias, eps).transpose(1, -1)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dimension of ``(N, C, *)`` tensors.

    Each sample and each position is normalised over its ``C`` values, then scaled and shifted
    per channel. Same arguments and attributes as ``nn.LayerNorm(num_channels)``, so it can
    stand in for BatchNorm on images, sequences and volumes alike.

    Args:
        num_channels: ``C``, the size of dimension 1.
        eps: added to the variance.
        elementwise_affine: learn a per-channel scale (``weight``, ones at start).
        bias: learn a per-channel shift (``bias``, zeros at start); only with ``elementwise_affine``.
        device: where the parameters are created.
        dtype: their dtype.

    Example:
        >>> norm = ChannelLayerNorm(64)
        >>> y = norm(torch.randn(8, 64, 16, 16))
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.normalized_shape = (int(num_channels),)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, **factory))
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Static normalized_shape (not x.shape[1]) keeps the module traceable by fx.
        y = F.layer_norm(x.transpose(1, -1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.transpose(1, -1)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class NormAct(nn.Module):
    """A normalisation followed by dropout and an activation, as three child modules.

    What a BatchNorm subclass with built-in extras (timm ``BatchNormAct2d``) becomes when its
    norm is swapped: the extras are kept as they were, in the same order.

    Args:
        norm: the normalisation module.
        drop: applied after ``norm`` (``nn.Identity`` when None).
        act: applied after ``drop`` (``nn.Identity`` when None).

    Example:
        >>> block = NormAct(ChannelLayerNorm(32), act=nn.SiLU())
    """

    def __init__(self, norm: nn.Module, drop: nn.Module | None = None, act: nn.Module | None = None):
        super().__init__()
        self.norm = norm
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.norm(x)))
