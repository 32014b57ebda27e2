"""Normalisation layers that swap in for BatchNorm: a channel LayerNorm and a norm + act block.

``ChannelLayerNorm`` normalises each sample and position of an ``(N, C, *)`` tensor over its
channels (the ConvNeXt ``LayerNorm2d`` form) and keeps the constructor of ``nn.LayerNorm``.
It swaps channels last, runs ``F.layer_norm`` and swaps them back, so it exports to ONNX as
``Transpose → LayerNormalization → Transpose`` (opset ≥ 17). :func:`layer_norm_for` builds the
one that stands in for a given BatchNorm; :func:`layer_norm_like` computes the same, functionally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ChannelLayerNorm",
    "NormAct",
    "batch_norm_extras",
    "channel_layer_norm",
    "layer_norm_for",
    "layer_norm_like",
]

_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# BatchNorm subclasses whose extra behaviour is known: children applied after the norm, in order.
_EXTRAS = {
    "timm.layers.norm_act.BatchNormAct2d": ("drop", "act"),
    "timm.layers.norm_act.SyncBatchNormAct": ("drop", "act"),
}


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
        # A checkpoint of the BatchNorm this stands in for (``bn1.weight``) loads into ``bn1.norm``.
        self.register_load_state_dict_pre_hook(_accept_batch_norm_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.norm(x)))


def _accept_batch_norm_keys(module: NormAct, state_dict, prefix, *_args) -> None:
    """Load-state-dict pre-hook: move ``prefix.weight``/``prefix.bias`` (the BatchNorm's) to ``prefix.norm.``."""
    for name in ("weight", "bias"):
        key = f"{prefix}{name}"
        if key in state_dict and f"{prefix}norm.{name}" not in state_dict:
            state_dict[f"{prefix}norm.{name}"] = state_dict.pop(key)


def batch_norm_extras(module: nn.Module) -> tuple[str, ...] | None:
    """Children a BatchNorm applies after normalising, or None when its subclass is not understood.

    Example:
        >>> batch_norm_extras(nn.BatchNorm2d(8))
        ()
    """
    cls = type(module)
    if cls in _PLAIN:
        return ()
    known = _EXTRAS.get(f"{cls.__module__}.{cls.__qualname__}")
    if known is not None:
        return tuple(n for n in known if isinstance(getattr(module, n, None), nn.Module))
    # A subclass that only changes construction (torch's own forward, no children) is a plain BN.
    if getattr(cls.forward, "__module__", "").startswith("torch.nn") and next(module.children(), None) is None:
        return ()
    return None


def layer_norm_for(bn: nn.Module, rank: int, over: str = "c") -> nn.Module:
    """The LayerNorm-family module that stands in for ``bn`` on inputs of rank ``rank``.

    Args:
        bn: a BatchNorm, or a subclass :func:`batch_norm_extras` understands.
        rank: the rank of its input: 2 gives ``nn.LayerNorm(C)``; higher ranks give
            ``ChannelLayerNorm(C)`` or, with ``over="chw"``, ``nn.GroupNorm(1, C)``.
        over: ``"c"`` or ``"chw"``.

    Returns:
        The norm, sharing ``bn``'s γ and β and keeping its ε, wrapped in a :class:`NormAct`
        with ``bn``'s extras when it has any.

    Example:
        >>> layer_norm_for(nn.BatchNorm2d(8), 4)
        ChannelLayerNorm(8, eps=1e-05, elementwise_affine=True)
    """
    c, affine = bn.num_features, bn.affine
    if rank == 2:
        norm = nn.LayerNorm(c, eps=bn.eps, elementwise_affine=affine)
    elif over == "chw":
        norm = nn.GroupNorm(1, c, eps=bn.eps, affine=affine)
    else:
        norm = ChannelLayerNorm(c, eps=bn.eps, elementwise_affine=affine)
    if affine:  # the same parameters: γ and β carry over, optimizer references stay valid
        norm.weight, norm.bias = bn.weight, bn.bias
    extras = batch_norm_extras(bn)
    return NormAct(norm, **{n: getattr(bn, n) for n in extras}) if extras else norm


def layer_norm_like(x: torch.Tensor, over: str, weight, bias, eps: float) -> torch.Tensor:
    """What :func:`layer_norm_for`'s module computes on ``x``, given γ, β and ε as values."""
    if x.dim() == 2:
        return F.layer_norm(x, (x.shape[1],), weight, bias, eps)
    if over == "chw":
        return F.group_norm(x, 1, weight, bias, eps)
    return channel_layer_norm(x, weight, bias, eps)
