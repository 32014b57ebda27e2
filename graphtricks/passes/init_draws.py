"""Initializers: the fans of each weight of a layer, and seeded draws of Xavier, He and orthogonal values.

What a layer's weights are (matrices, stacked gates, grouped convolutions) is told here; which
initializer and gain each gets is the ``init`` pass's decision, from the graph. Draws take an
explicit generator, so they never touch the global RNG, and are made in float32 (QR and
half-precision sampling need it) for the caller to cast.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphtricks.layers import is_zoo_linear

__all__ = ["CONV_TYPES", "RECURRENT_TYPES", "weight_specs", "conv_fans", "is_bias", "draw", "orthogonal"]

CONV_TYPES = (nn.modules.conv._ConvNd,)
RECURRENT_TYPES = (nn.RNNBase, nn.RNNCellBase)
_CONV_TRANSPOSE_FUNCTIONS = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def is_bias(name: str) -> bool:
    """True for a parameter name that is a bias (of a layer, a recurrent cell or attention)."""
    return name == "bias" or name.startswith(("bias_ih", "bias_hh", "in_proj_bias"))


def conv_fans(shape: torch.Size, groups: int, transposed: bool) -> tuple[int, int]:
    """(fan_in, fan_out) of one group; a transposed conv stores (in, out/groups, *kernel)."""
    rf = math.prod(shape[2:])
    if transposed:
        return shape[0] // groups * rf, shape[1] * rf
    return shape[1] * rf, shape[0] // groups * rf


def weight_specs(module: nn.Module, call: fx.Node | None = None) -> list[tuple[str, int, int, int, bool]]:
    """(name, fan_in, fan_out, row blocks, recurrent) of each weight matrix of a module.

    Args:
        module: a layer: Linear (transformers ``Conv1D`` too), Conv/ConvTranspose, RNN/LSTM/GRU (cells too), MultiheadAttention.
        call: the ``F.linear``/``F.conv*`` node that applies a plain module's ``weight`` in a graph
            (timm ``StdConv2d``, ``Conv2dSame``), which tells what that weight is.

    Returns:
        One entry per weight matrix; ``row blocks`` is how many matrices are stacked in its rows
        (recurrent gates, attention's q/k/v); ``recurrent`` marks hidden-to-hidden weights.
        Empty for a module with no weight matrix this knows.

    Example:
        >>> weight_specs(nn.Conv2d(8, 16, 3, groups=2))
        [('weight', 36, 72, 1, False)]
    """
    if isinstance(module, CONV_TYPES):
        return [("weight", *conv_fans(module.weight.shape, module.groups, module.transposed), 1, False)]
    if isinstance(module, nn.Linear):
        return [("weight", module.in_features, module.out_features, 1, False)]
    if is_zoo_linear(module) and getattr(module, "weight", None) is not None:  # transformers Conv1D: (in, out)
        return [("weight", module.weight.shape[0], module.weight.shape[1], 1, False)]
    weight = getattr(module, "weight", None)
    if call is not None and isinstance(weight, nn.Parameter) and weight.dim() >= 2:
        if call.target is F.linear:
            return [("weight", weight.shape[1], weight.shape[0], 1, False)]
        groups = call.args[6] if len(call.args) > 6 else call.kwargs.get("groups", 1)  # conv and conv_transpose
        transposed = call.target in _CONV_TRANSPOSE_FUNCTIONS
        return [("weight", *conv_fans(weight.shape, int(groups), transposed), 1, False)]
    out = []
    if isinstance(module, RECURRENT_TYPES):
        for name, p in module.named_parameters(recurse=False):
            if name.startswith(("weight_ih", "weight_hh")):  # gates stacked: (gates * hidden, in)
                gates = p.shape[0] // module.hidden_size
                out.append((name, p.shape[1], module.hidden_size, gates, name.startswith("weight_hh")))
            elif name.startswith("weight_hr"):
                out.append((name, p.shape[1], p.shape[0], 1, False))
    elif isinstance(module, nn.MultiheadAttention):
        for name, p in module.named_parameters(recurse=False):
            if name.endswith("proj_weight"):
                blocks = 3 if name == "in_proj_weight" else 1
                out.append((name, p.shape[1], p.shape[0] // blocks, blocks, False))
    return out


def draw(
    shape: torch.Size,
    method: str,
    gain: float,
    fan_in: int,
    fan_out: int,
    *,
    blocks: int = 1,
    mode: str = "fan_in",
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, dict]:
    """Draw a float32 weight with an initializer, and describe what was drawn.

    Args:
        shape: the weight's shape (rows first).
        method: xavier-uniform, xavier-normal, he-uniform, he-normal or orthogonal.
        gain: the nonlinearity's gain (``nn.init.calculate_gain``).
        fan_in: inputs per output (of one group).
        fan_out: outputs per input (of one group).
        blocks: matrices stacked in the rows; orthogonal draws one per block.
        mode: ``fan_in`` or ``fan_out``, the fan He initializers divide by (Xavier averages both).
        generator: the source of randomness, on ``device``.
        device: where to draw.

    Returns:
        ``(w, info)``: the float32 tensor and ``{"initializer", "gain", "fan", "fan_mode",
        "fan_in", "fan_out", "std", "std_measured"}``.

    Example:
        >>> w, info = draw((64, 32), "he-normal", 2 ** 0.5, 32, 64, generator=torch.Generator().manual_seed(0))
        >>> info["std"]
        0.25
    """
    w = torch.empty(shape, dtype=torch.float32, device=device)  # QR and fp16/bf16 need float32
    flat = w.view(shape[0], -1)
    fan, fan_mode = None, None
    if method == "orthogonal":
        rows = shape[0] // blocks  # one orthogonal matrix per gate of a recurrent weight
        for i in range(blocks):
            flat[i * rows:(i + 1) * rows] = orthogonal(rows, flat.shape[1], generator, device) * gain
        std = gain / math.sqrt(max(rows, flat.shape[1]))
    else:
        if method.startswith("xavier"):
            fan, fan_mode = (fan_in + fan_out) / 2, "average"
        else:
            fan, fan_mode = (fan_in, "fan_in") if mode == "fan_in" else (fan_out, "fan_out")
        std = gain / math.sqrt(fan)
        if method.endswith("uniform"):
            w.uniform_(-math.sqrt(3.0) * std, math.sqrt(3.0) * std, generator=generator)
        else:
            w.normal_(0.0, std, generator=generator)
    info = {"initializer": method, "gain": gain, "fan": fan, "fan_mode": fan_mode, "fan_in": fan_in,
            "fan_out": fan_out, "std": std, "std_measured": _sample_std(w)}
    return w, info


def orthogonal(rows: int, cols: int, gen: torch.Generator, device: torch.device | str | None) -> torch.Tensor:
    """A (rows, cols) float32 matrix with orthonormal rows or columns, Haar-distributed."""
    a = torch.randn(max(rows, cols), min(rows, cols), generator=gen, device=device)
    q, r = torch.linalg.qr(a)
    q = q * torch.where(torch.diagonal(r) >= 0, 1.0, -1.0)  # the sign fix makes Q uniform
    return q if rows >= cols else q.T


def _sample_std(w: torch.Tensor) -> float:
    """The std of (up to 65,536 of) the drawn values: a check on the record, at a fixed cost."""
    sample = w.reshape(-1)[: 1 << 16]
    return float(sample.std()) if sample.numel() > 1 else 0.0
