"""Residual wrappers and shortcuts: ``H(x) = act(F(x) + α·S(x))`` around an existing block.

``Residual`` holds the block as ``body`` with its shortcut ``S`` (``nn.Identity``, a
parameter-free :class:`PadShortcut`, or a bias-free 1×1 conv / ``nn.Linear``, optionally
followed by BatchNorm), an optional learnable gate ``α`` and an optional ReLU after the sum.
``ResidualSpan`` holds the same parts for a shortcut around a stretch of a traced graph, which
has no module of its own. Both carry the marker attribute ``gt_residual``, which survives
re-capture (fx copies public attributes), so a rewrite never wraps a block twice. A traced
graph that holds wrapped blocks lists them in its attribute ``gt_residual_wrapped``
(``REGISTRY``), since a re-traced wrapper is a plain module without the class.

Layout: tensors of rank ≥ 3 are channels-first ``(N, C, *spatial)``; rank 2 is ``(N, D)``.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn
from torch.nn.utils import skip_init

__all__ = [
    "GATES",
    "MARKER",
    "POST_ACTS",
    "REGISTRY",
    "SHORTCUTS",
    "PadShortcut",
    "Residual",
    "ResidualSpan",
    "choose_shortcut",
    "make_shortcut",
]

SHORTCUTS = ("auto", "identity", "pad", "conv")
POST_ACTS = ("none", "relu")
# none: H = F + S.  zero: H = F + α·S, α = 0 at first (the model computes what it did).
# zero-branch: H = α·F + S, α = 0 at first (the block starts as its shortcut: a deep net that
# does not train as it is starts as a shallow one that does).
GATES = ("none", "zero", "zero-branch")
MARKER = "gt_residual"
# A re-traced region rebuilds containers as plain modules (the Residual class is gone), so
# each graph module also lists what it wrapped, as an attribute that capture carries over.
REGISTRY = "gt_residual_wrapped"
_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_NORMS = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _smallest_stride(size_in: int, size_out: int) -> int | None:
    """The smallest s with ceil(size_in / s) == size_out (what a stride-s 1×1 conv or x[::s] gives)."""
    if not 1 <= size_out <= size_in:
        return None
    return next((s for s in range(1, size_in + 1) if -(-size_in // s) == size_out), None)


def choose_shortcut(
    kind: str, in_shape, out_shape, in_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None
) -> tuple[str, tuple[int, ...]]:
    """Pick the shortcut that maps a block's input shape onto its output shape.

    ``auto`` gives identity when the shapes match, pad when only channels (features) grow,
    conv otherwise; ``pad`` on equal shapes is the identity.

    Args:
        kind: ``auto``, ``identity``, ``pad`` or ``conv``.
        in_shape: the block's input shape, ``(N, D)`` or ``(N, C, *spatial)``.
        out_shape: the block's output shape, same rank.
        in_dtype: the input dtype (checked against ``out_dtype`` when both are given).
        out_dtype: the output dtype.

    Returns:
        ``(kind, stride)``: the concrete kind (identity/pad/conv) and one stride per spatial dim.

    Raises:
        ValueError: no shortcut of that kind fits (the message says why).

    Example:
        >>> choose_shortcut("auto", (8, 16, 32, 32), (8, 32, 16, 16))
        ('conv', (2, 2))
    """
    a, b = tuple(int(d) for d in in_shape), tuple(int(d) for d in out_shape)
    if in_dtype is not None and out_dtype is not None and in_dtype != out_dtype:
        raise ValueError(f"the dtype changes ({in_dtype} → {out_dtype})")
    if len(a) != len(b):
        raise ValueError("the rank changes")
    if not 2 <= len(a) <= 5:
        raise ValueError("shortcuts need (N, D) vectors or (N, C, *spatial) maps with 1-3 spatial dims")
    if a[0] != b[0]:
        raise ValueError("the batch size changes")
    stride = []
    for i, (sa, sb) in enumerate(zip(a[2:], b[2:]), start=2):
        s = _smallest_stride(sa, sb)
        if s is None:
            why = "upsampling" if sb > sa else "not a division by an integer stride"
            raise ValueError(f"dim {i} goes {sa} → {sb}: {why}")
        stride.append(s)
    grow = b[1] - a[1]
    if kind == "auto":
        kind = "identity" if a == b else ("pad" if grow > 0 and all(s == 1 for s in stride) else "conv")
    if kind == "identity" and a != b:
        raise ValueError("the shapes differ; use shortcut pad or conv")
    if kind == "pad" and grow < 0:
        raise ValueError("there are fewer channels out than in; zero-padding cannot remove any, use shortcut conv")
    if kind == "pad" and a == b:
        kind = "identity"
    dtype = in_dtype or out_dtype
    if kind == "conv" and dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"a conv shortcut needs floating-point tensors, not {dtype}")
    return kind, tuple(stride)


class PadShortcut(nn.Module):
    """Parameter-free shortcut (ResNet option A): subsample by ``stride``, zero-pad channels.

    Args:
        in_channels: channels (features) of the input, dimension 1.
        out_channels: channels of the output; ``out_channels - in_channels`` zeros are appended.
        stride: one stride per spatial dimension (empty for ``(N, D)`` vectors).

    Example:
        >>> PadShortcut(16, 32, (2, 2))(torch.randn(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: tuple[int, ...] = ()):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Static slices and pad widths: traceable by fx and exported as ONNX Slice/Pad.
        if any(s > 1 for s in self.stride):
            x = x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in self.stride)]
        extra = self.out_channels - self.in_channels
        if extra:
            # Zeros concatenated rather than F.pad: after an ONNX Pad the TorchScript exporter
            # loses static shapes, and a later adaptive pool then cannot be exported.
            zeros = torch.zeros_like(x[:, :1]).expand(-1, extra, *([-1] * len(self.stride)))
            x = torch.cat([x, zeros], dim=1)
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def make_shortcut(
    kind: str,
    in_shape,
    out_shape,
    stride: tuple[int, ...] = (),
    *,
    norm: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    seed_name: str = "",
) -> nn.Module:
    """Build the shortcut module chosen by :func:`choose_shortcut`.

    A conv shortcut is a bias-free 1×1 ``ConvNd`` with the stride (``nn.Linear`` for vectors),
    He-initialised (``kaiming_normal_``, fan_out, ReLU gain) from a generator seeded by
    ``seed_name``, so the rewrite is deterministic and leaves the global RNG alone.

    Args:
        kind: ``identity``, ``pad`` or ``conv``.
        in_shape: the block's input shape.
        out_shape: the block's output shape.
        stride: per spatial dimension.
        norm: follow a conv shortcut with BatchNorm (``nn.Sequential(conv, bn)``).
        dtype: parameter dtype (the block's activation dtype).
        device: where the parameters live.
        seed_name: seeds the initialisation (the block's qualified name).

    Returns:
        The shortcut module.

    Example:
        >>> make_shortcut("conv", (8, 16, 32, 32), (8, 32, 16, 16), (2, 2), norm=True)
    """
    c_in, c_out = int(in_shape[1]), int(out_shape[1])
    if kind == "identity":
        return nn.Identity()
    if kind == "pad":
        return PadShortcut(c_in, c_out, stride)
    spatial = len(in_shape) - 2
    # skip_init: the layer's own reset_parameters would draw from the global RNG first.
    if spatial == 0:
        proj = skip_init(nn.Linear, c_in, c_out, bias=False)
    else:
        proj = skip_init(_CONVS[spatial], c_in, c_out, 1, stride=stride, bias=False)
    gen = torch.Generator().manual_seed(zlib.crc32(seed_name.encode()))
    with torch.no_grad():
        nn.init.kaiming_normal_(proj.weight, mode="fan_out", nonlinearity="relu", generator=gen)
    module = nn.Sequential(proj, _NORMS[spatial](c_out)) if norm else proj
    return module.to(device=device, dtype=dtype)


class _ResidualParts(nn.Module):
    """The shortcut, gate and post-activation shared by both wrappers."""

    def __init__(self, shortcut: nn.Module | None, gate: str, post_act: str, dtype=None, device=None, body=None):
        super().__init__()
        if gate not in GATES or post_act not in POST_ACTS:
            raise ValueError(f"gate must be one of {GATES} and post_act one of {POST_ACTS}")
        if body is not None:
            self.body = body  # first, so state dicts list the block before the new parts
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        if gate != "none":
            self.gate = nn.Parameter(torch.zeros((), dtype=dtype, device=device))
        else:
            self.register_parameter("gate", None)
        self.gate_on = "branch" if gate == "zero-branch" else "shortcut"  # what α scales
        self.post_act = post_act

    def merge(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``act(out + α·S(x))`` (or ``act(α·out + S(x))`` gating the branch): output plus shortcut."""
        # passes/residual_graph.add_merge_nodes computes the same in a traced graph: keep the two in step.
        s = self.shortcut(x)
        if self.gate is not None and self.gate_on == "branch":
            out = self.gate * out
        elif self.gate is not None:
            s = self.gate * s
        out = out + s
        return torch.relu(out) if self.post_act == "relu" else out


class Residual(_ResidualParts):
    """``H(x) = act(body(x) + α·shortcut(x))``.

    The block's state-dict keys gain ``body.`` (``stages.1.0.weight`` → ``stages.1.body.0.weight``);
    ``load_state_dict`` also accepts the unwrapped keys, so a checkpoint of the original model
    loads (with ``strict=False`` for the new shortcut and gate parameters).

    Args:
        body: the block ``F``; takes one tensor and returns one.
        shortcut: ``S`` (None: identity).
        gate: ``"zero"`` adds a learnable scalar ``α`` on the shortcut, starting at 0 (``H = F`` at
            first); ``"zero-branch"`` puts it on the body instead (``H = α·F + S``: ``H = S`` at first).
        post_act: ``"relu"`` applies ReLU after the sum.
        dtype: dtype of the gate.
        device: device of the gate.

    Example:
        >>> block = Residual(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()), post_act="relu")
    """

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None, *, gate="none", post_act="none",
                 dtype=None, device=None):
        super().__init__(shortcut, gate, post_act, dtype, device, body)
        self.gt_residual = "block"
        self.register_load_state_dict_pre_hook(_accept_unwrapped_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(self.body(x), x)


class ResidualSpan(_ResidualParts):
    """The shortcut and gate of a residual around a span ``FIRST:LAST`` of a traced graph.

    The span's nodes stay where they are; the graph calls this module's parts after ``LAST``.
    ``forward(out, x)`` computes the same merge for use outside a graph.

    Args:
        shortcut: ``S`` (None: identity).
        span: ``"FIRST:LAST"``, the node names; also the marker that prevents a second wrap.
        gate: ``"none"``, ``"zero"`` (on the shortcut) or ``"zero-branch"`` (on the span's output).
        post_act: ``"none"`` or ``"relu"``.
        dtype: dtype of the gate.
        device: device of the gate.
    """

    def __init__(self, shortcut: nn.Module | None, *, span: str, gate="none", post_act="none", dtype=None, device=None):
        super().__init__(shortcut, gate, post_act, dtype, device)
        self.span = span
        self.gt_residual = f"span {span}"

    def forward(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.merge(out, x)


def _accept_unwrapped_keys(module: Residual, state_dict, prefix, *_args) -> None:
    """Load-state-dict pre-hook: move ``prefix.X`` to ``prefix.body.X`` for keys of the body.

    A key belongs to the body when it is one of the body's keys, or becomes one through the
    load hooks of the body's own modules (run after this one: BN→LN's ``bn.weight`` →
    ``bn.norm.weight``); any other key is left where it is, to be reported under its own name.
    """
    body = module.body
    candidates = [k[len(prefix):] for k in state_dict
                  if k.startswith(prefix) and f"{prefix}body.{k[len(prefix):]}" not in state_dict]
    markers = {rest: object() for rest in candidates}  # the hooks move them as they would tensors
    probe = dict(markers)
    for name, sub in body.named_modules():
        for hook in list(sub._load_state_dict_pre_hooks.values()):
            try:
                hook(probe, f"{name}." if name else "", {}, False, [], [], [])
            except Exception:  # a hook that needs real tensors: its keys go by name alone
                continue
    keys = body.state_dict(keep_vars=True).keys()
    landed = {id(v) for k, v in probe.items() if k in keys}
    for rest, marker in markers.items():
        if id(marker) in landed:
            state_dict[f"{prefix}body.{rest}"] = state_dict.pop(f"{prefix}{rest}")
