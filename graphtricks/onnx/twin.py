"""The export twins: a model's train-mode (or MC-dropout) forward with its semantics made explicit.

An exporter sees ops, not modes: torch's ``torch.export``-based ONNX exporter writes a train-mode
Dropout as inference Dropout and folds a train-mode BatchNorm into the Conv before it with its
running statistics. The twin is a copy of the model whose forward is the model's own forward in
one mode, run under :class:`TwinMode`, a ``TorchFunctionMode`` that replaces, wherever PyTorch
code calls them (a module, a functional call in an fx-regenerated forward, timm's
``BatchNormAct2d``, ``nn.MultiheadAttention``'s internals), exactly two things:

- **dropout** (``F.dropout``, ``F.dropout1d/2d/3d``, ``torch.dropout``, ``torch.feature_dropout``,
  attention's ``dropout_p``) by explicit random ops: ``keep = rand_like(x) >= p``,
  ``mask = keep.to(dtype) * float(1 / (1 - p))``, ``x * mask``; channel dropout draws its mask
  shaped ``(N, C, 1, ...)``. Survivors equal PyTorch's ``x * (1 / (1 - p))`` bit for bit.
  Alpha dropout (``F.alpha_dropout``, ``F.feature_alpha_dropout``, channel masks for the latter)
  is ``x * (keep * a) + where(keep, alpha a p, alpha a (p - 1))``: PyTorch's affine transform,
  its values bit for bit (:func:`alpha_dropout_values`);
- **train-mode BatchNorm** (``F.batch_norm``/``torch.batch_norm`` with ``training=True``) by batch
  statistics, ``d = x - mean``, biased ``var = mean(d * d)`` (two passes),
  ``y = d * (weight / sqrt(var + eps)) + bias``; the running statistics PyTorch would write
  (unbiased variance, the call's momentum, or for ``momentum=None`` the cumulative factor
  ``1 / (num_batches_tracked + 1)`` as a tensor) and ``num_batches_tracked + 1`` are returned as
  extra outputs named ``updated.<buffer>``: the exported program writes no buffer.

Everything else is the model's own forward in that mode (timm ``DropPath`` keeps drawing its
per-sample masks in the train twin). A function mode, rather than swapping modules, catches
every way PyTorch code reaches these functions, and rather than a graph rewrite after export
it works on any exporter: what is exported is plain ops.

The *MC-dropout twin* is the eval-mode forward with every dropout active (BatchNorm on running
statistics, no ``updated.*`` outputs).

Each replacement runs inside a *site* module registered on the copy (``graphtricks.dropout.<k>``,
``graphtricks.bn.<k>``): torch.export records it in every node's module stack, and the ONNX
exporter writes that stack into the nodes' metadata, which is how
:func:`graphtricks.onnx.portable.name_twin_sites` finds and names each site's nodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from graphtricks.errors import ExportError
from graphtricks.onnx.draws import call_argument
from graphtricks.onnx.eager import flatten_outputs

__all__ = ["SITES_ATTRIBUTE", "TwinMode", "alpha_dropout_values", "make_twin", "updated_names"]

# The attribute of the copy holding the site modules; their names are graphtricks.<kind>.<k>.
SITES_ATTRIBUTE = "graphtricks"
UPDATED_PREFIX = "updated."  # graphtricks.onnx.portable.UPDATED_PREFIX, which imports this module

# function -> (how many trailing dims a channel mask sets to 1: None for element dropout,
#              index of p, index of the training flag)
_DROPOUTS: dict[Any, tuple[int | None, int, int]] = {
    F.dropout: (None, 1, 2),
    F.dropout1d: (1, 1, 2),
    F.dropout2d: (2, 1, 2),
    F.dropout3d: (3, 1, 2),
    torch.dropout: (None, 1, 2),
    torch.dropout_: (None, 1, 2),
    torch.feature_dropout: (-1, 1, 2),
    torch.feature_dropout_: (-1, 1, 2),
}
# Alpha dropout (SELU networks): function -> (channel mask as in _DROPOUTS, index of p, of the flag)
_ALPHA: dict[Any, tuple[int | None, int, int]] = {
    F.alpha_dropout: (None, 1, 2),
    F.feature_alpha_dropout: (-1, 1, 2),
    torch.alpha_dropout: (None, 1, 2),
    torch.alpha_dropout_: (None, 1, 2),
    torch.feature_alpha_dropout: (-1, 1, 2),
    torch.feature_alpha_dropout_: (-1, 1, 2),
}
_TORCH_LEVEL = (torch.dropout, torch.dropout_, torch.feature_dropout, torch.feature_dropout_,
                torch.alpha_dropout, torch.alpha_dropout_, torch.feature_alpha_dropout,
                torch.feature_alpha_dropout_)
_IN_PLACE = (torch.dropout_, torch.feature_dropout_, torch.alpha_dropout_, torch.feature_alpha_dropout_)
# SELU's saturation value is -SELU_ALPHA * SELU_SCALE; PyTorch's alpha dropout writes it so
_SELU_SATURATION = 1.7580993408473766
_BATCH_NORMS = (F.batch_norm, torch.batch_norm)


class DropoutSite(nn.Module):
    """One dropout call of the model, as explicit random ops."""

    def forward(self, x: torch.Tensor, p: float, spatial: int | None) -> torch.Tensor:
        """``x * mask``; ``spatial`` trailing dims of the mask are 1 (channel dropout), or -1:
        all but the first two (``torch.feature_dropout``)."""
        kept = torch.rand_like(_mask_like(x, spatial)) >= p
        # float(1 / (1 - p)) in the data's dtype: PyTorch's own scale, so survivors match bit for bit
        return x * (kept.to(x.dtype) * (1.0 / (1.0 - p)))


def alpha_dropout_values(p: float, dtype: torch.dtype) -> tuple[float, float, float]:
    """PyTorch's alpha dropout as values of ``dtype``: the survivors' scale ``a`` and the shift
    added to a kept and to a dropped element.

    PyTorch (``ATen/native/Dropout.cpp``) computes, with ``noise`` the kept (1) / dropped (0)
    mask, ``a = 1 / sqrt((alpha^2 p + 1)(1 - p))`` and ``b = (noise - 1) * (alpha a) + alpha a p``
    in ``dtype``, each scalar rounded to ``dtype`` first, then ``x * (noise * a) + b``: where
    kept ``x * a + alpha a p``, where dropped ``alpha a (p - 1)``. The same roundings (in numpy:
    this runs while torch.export traces, where no real tensor can be made) give the same values.

    Raises:
        ExportError: ``dtype`` is not a float type alpha dropout is written for.
    """
    import ml_dtypes
    import numpy as np

    kinds = {torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16,
             torch.float32: np.float32, torch.float64: np.float64}
    if dtype not in kinds:
        raise ExportError(f"alpha dropout on {dtype} data has no explicit form; use a float type")
    kind = kinds[dtype]
    wide = np.float64 if dtype == torch.float64 else np.float32  # PyTorch's compute type
    alpha = _SELU_SATURATION
    a = 1.0 / math.sqrt((alpha * alpha * p + 1) * (1 - p))
    alpha_a, alpha_a_p = kind(alpha * a), kind(alpha * a * p)
    dropped = kind(wide(-alpha_a) + wide(alpha_a_p))  # (0 - 1) * alpha a + alpha a p
    return float(kind(a)), float(alpha_a_p), float(dropped)


def _mask_like(x: torch.Tensor, spatial: int | None) -> torch.Tensor:
    """``x``, or for channel dropout the slice of it a mask is drawn like: ``spatial`` trailing
    dims set to 1, or -1: all but the first two (``torch.feature_dropout``)."""
    if spatial is None:
        return x
    keep = 2 if spatial < 0 else max(x.dim() - spatial, 1)
    return x[tuple([slice(None)] * keep + [slice(0, 1)] * (x.dim() - keep))]


class AlphaDropoutSite(nn.Module):
    """One alpha-dropout call of the model (``nn.AlphaDropout``, ``nn.FeatureAlphaDropout``), as
    explicit random ops: ``x * mask + shift``, the values of :func:`alpha_dropout_values`."""

    def forward(self, x: torch.Tensor, p: float, spatial: int | None) -> torch.Tensor:
        """``spatial`` as for :class:`DropoutSite` (``FeatureAlphaDropout``: -1)."""
        kept = torch.rand_like(_mask_like(x, spatial)) >= p
        scale, kept_shift, dropped_shift = alpha_dropout_values(p, x.dtype)
        # constants of x's dtype (a Python float would make a float32 Where), which both exporters
        # write as initializers or Constant nodes
        values = [torch.tensor(v, dtype=x.dtype, device=x.device) for v in (kept_shift, dropped_shift)]
        shift = torch.where(kept, *values)
        return x * (kept.to(x.dtype) * scale) + shift


class BatchNormSite(nn.Module):
    """One train-mode batch-norm call: batch statistics, and the running statistics it would write."""

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
        running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
        momentum: float, eps: float, count: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """The normalised ``x``, then the new running mean and variance when tracked.

        ``count``: the new ``num_batches_tracked`` of a BatchNorm averaging cumulatively
        (``momentum=None``), whose factor is then ``1 / count`` rather than ``momentum``.
        The statistics reduce every dimension but 1 in place (no view of the data: the exporter
        would move a view's nodes to its reader, out of the site)."""
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dim=dims, keepdim=True)
        centred = x - mean
        var = (centred * centred).mean(dim=dims, keepdim=True)
        channel = [1, -1] + [1] * (x.dim() - 2)
        scale = (var + eps).sqrt().reciprocal()
        if weight is not None:
            scale = scale * weight.reshape(channel)
        y = centred * scale
        if bias is not None:
            y = y + bias.reshape(channel)
        if running_mean is None or running_var is None:
            return (y,)
        size = x.numel() // x.shape[1]
        unbiased = var.reshape(-1) * (size / max(size - 1, 1))
        factor: Any = momentum if count is None else count.to(running_mean.dtype).reciprocal()
        new_mean = running_mean * (1.0 - factor) + mean.reshape(-1) * factor
        new_var = running_var * (1.0 - factor) + unbiased * factor
        return y, new_mean, new_var


class CounterSite(nn.Module):
    """A BatchNorm's ``num_batches_tracked.add_(1)``, as a new value."""

    def forward(self, counter: torch.Tensor, step: Any) -> torch.Tensor:
        return counter + step


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
    is_causal: bool, scale: float | None, enable_gqa: bool, drop: Callable,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` in plain ops, its dropout by ``drop`` (a dropout site)."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    factor = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * factor
    if is_causal:
        lq, lk = q.shape[-2], k.shape[-2]
        causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    probs = scores.softmax(dim=-1)
    if is_causal or (attn_mask is not None and attn_mask.dtype == torch.bool):
        probs = probs.nan_to_num(0.0)  # a fully masked row attends to nothing, as PyTorch's math backend
    return drop(probs) @ v


class TwinMode(TorchFunctionMode):
    """Replaces dropout and train-mode batch norm by explicit ops, in site modules of ``root``.

    Args:
        root: The copy being exported; sites are registered on it under ``graphtricks``.
        mc: MC-dropout: every dropout applies whatever its training flag, batch norm is left alone.

    Attributes:
        updated: ``(buffer name, new value)`` of every running statistic written, in call order.
    """

    def __init__(self, root: nn.Module, mc: bool = False) -> None:
        super().__init__()
        self.root, self.mc = root, mc
        self.inference = not root.training and not mc  # the inference twin: no dropout may apply
        self.updated: list[tuple[str, torch.Tensor]] = []
        self.counts = {"dropout": 0, "bn": 0}
        self.buffer_names: dict[int, str] = {}
        self.counters: dict[str, torch.Tensor] = {}  # a BatchNorm's path -> its new batch count

    def start(self) -> None:
        """Resets the call counters and reads the buffers' names (as tracing swapped them in)."""
        self.updated, self.counts, self.counters = [], {"dropout": 0, "bn": 0}, {}
        self.buffer_names = {id(b): n for n, b in self.root.named_buffers(remove_duplicate=False)}

    def _site(self, kind: str, factory: type[nn.Module], counted: bool = True) -> nn.Module:
        """The next site of ``kind``, made (and registered) on first use; not ``counted``: one
        that shares the number of the next ``bn`` site (its BatchNorm's batch counter)."""
        sites = getattr(self.root, SITES_ATTRIBUTE, None)
        if sites is None:
            sites = nn.ModuleDict({n: nn.ModuleDict() for n in ("dropout", "bn", "count")})
            setattr(self.root, SITES_ATTRIBUTE, sites)
        k = str(self.counts["bn" if kind == "count" else kind])
        if counted:
            self.counts[kind] += 1
        if k not in sites[kind]:
            sites[kind][k] = factory()
        return sites[kind][k]

    def _cumulative(self, owner: str) -> bool:
        """Whether the module at path ``owner`` is a BatchNorm with ``momentum=None``."""
        module = self.root.get_submodule(owner) if owner else self.root.__dict__["_graphtricks_model"]
        return isinstance(module, nn.modules.batchnorm._NormBase) and module.momentum is None

    def _dropout(self, x: torch.Tensor, p: float, spatial: int | None, inplace: bool = False,
                 alpha: bool = False) -> torch.Tensor:
        if self.inference:
            raise ExportError(
                "the inference graph applies dropout: the model drops out in eval mode (an fx graph "
                "traced in train mode bakes training=True in); trace it in eval mode"
            )
        # in place or not, the result is returned: writing it back into x (copy_) would add an
        # Expand to the TorchScript graph, and forwards use what dropout returns
        del inplace
        if alpha:
            return self._site("dropout", AlphaDropoutSite)(x, p, spatial)
        return self._site("dropout", DropoutSite)(x, p, spatial)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _DROPOUTS or func in _ALPHA:
            spatial, p_at, train_at = _DROPOUTS[func] if func in _DROPOUTS else _ALPHA[func]
            p = float(call_argument(args, kwargs, "p", p_at, 0.5))
            # F.alpha_dropout's training flag defaults to False, F.dropout's to True
            flag = call_argument(args, kwargs, "train" if func in _TORCH_LEVEL else "training",
                                 train_at, func in _DROPOUTS)
            if p > 0 and (flag or self.mc):
                inplace = func in _IN_PLACE or (
                    func not in _TORCH_LEVEL and bool(call_argument(args, kwargs, "inplace", 3, False)))
                x = args[0] if args else kwargs["input"]
                return self._dropout(x, p, spatial, inplace, alpha=func in _ALPHA)
            return func(*args, **kwargs)
        if func in _BATCH_NORMS and not self.mc:
            return self._batch_norm(func, args, kwargs)
        if func is torch.Tensor.add_ and not self.mc and args and id(args[0]) in self.buffer_names:
            name = self.buffer_names[id(args[0])]
            if name.endswith("num_batches_tracked"):  # the BatchNorm about to run counts a batch
                step = args[1] if len(args) > 1 else kwargs.get("other", 1)
                counter = self._site("count", CounterSite, counted=False)(args[0], step)
                self.updated.append((name, counter))
                self.counters[name.rpartition(".")[0]] = counter
                return args[0]
        if func is torch.Tensor.__float__ and args and id(args[0]) in self.buffer_names:
            owner, _, buffer = self.buffer_names[id(args[0])].rpartition(".")
            if buffer == "num_batches_tracked" and owner in self.counters and self._cumulative(owner):
                # momentum=None: the BatchNorm reads its new count back for 1 / count, a Python
                # float the trace would fix; _batch_norm uses the counted tensor instead
                return 1.0
        if func is F.scaled_dot_product_attention:
            return self._sdpa(func, args, kwargs)
        if func is F.multi_head_attention_forward:
            return self._through(func, args, kwargs)
        return func(*args, **kwargs)

    def _batch_norm(self, func, args, kwargs):
        """A train-mode batch norm by batch statistics; eval mode as it is."""
        if func is F.batch_norm:
            names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
            defaults = (None, None, None, None, None, False, 0.1, 1e-5)
        else:
            names = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum",
                     "eps", "cudnn_enabled")
            defaults = (None,) * 5 + (False, 0.1, 1e-5, True)
        a = {n: call_argument(args, kwargs, n, i, d) for i, (n, d) in enumerate(zip(names, defaults))}
        if not a["training"]:
            return func(*args, **kwargs)
        site = self._site("bn", BatchNormSite)
        momentum = 0.1 if a["momentum"] is None else float(a["momentum"])
        owner = self.buffer_names.get(id(a["running_mean"]), "").rpartition(".")[0]
        # momentum=None averages cumulatively: factor 1 / num_batches_tracked, just counted
        count = self.counters.get(owner) if self._cumulative(owner) else None
        out = site(a["input"], a["weight"], a["bias"], a["running_mean"], a["running_var"],
                   momentum, float(a["eps"]), count)
        for buffer, value in zip((a["running_mean"], a["running_var"]), out[1:]):
            name = self.buffer_names.get(id(buffer))
            if name is None:
                raise RuntimeError("a train-mode batch norm updates running statistics that are "
                                   "not buffers of the model")
            self.updated.append((name, value))
        return out[0]

    def _sdpa(self, func, args, kwargs):
        """Attention in plain ops, its dropout (when on) a dropout site.

        Every twin decomposes attention alike, with or without dropout: the train and inference
        graphs then hold the same attention operators and constants, the train graph's dropout
        on top (as TorchScript's symbolic gave them).
        """
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        defaults = (None, None, None, None, 0.0, False, None, False)
        a = {n: call_argument(args, kwargs, n, i, d) for i, (n, d) in enumerate(zip(names, defaults))}
        p = float(a["dropout_p"])
        drop = (lambda t: self._dropout(t, p, None)) if p > 0 else (lambda t: t)
        return _attention(a["query"], a["key"], a["value"], a["attn_mask"], bool(a["is_causal"]),
                          a["scale"], bool(a["enable_gqa"]), drop)

    def _through(self, func, args, kwargs):
        """Runs a composite (``multi_head_attention_forward``) with its inner dropout and attention
        calls replaced: a mode does not see calls made inside a function it intercepted."""
        saved = {n: getattr(F, n) for n in ("dropout", "scaled_dot_product_attention")}
        mc = self.mc

        def dropout(x, p=0.5, training=True, inplace=False):
            return self._dropout(x, float(p), None, inplace) if p > 0 and (training or mc) else x

        def sdpa(*a, **k):
            return self._sdpa(saved["scaled_dot_product_attention"], a, k)

        if mc:  # eval mode passes training=False, which zeroes dropout_p inside
            kwargs["training"] = True
            args = args[:13] + (True,) + args[14:] if len(args) > 13 else args
        try:
            F.dropout, F.scaled_dot_product_attention = dropout, sdpa
            return func(*args, **kwargs)
        finally:
            F.dropout, F.scaled_dot_product_attention = saved["dropout"], saved["scaled_dot_product_attention"]


class _Twin(nn.Module):
    """The exported module: the model's children, parameters and buffers under their own names,
    plus the sites; its forward calls the model (a child of nothing, so that no container of
    the model ever iterates over the sites) under the mode."""

    def __init__(self, model: nn.Module, mode_factory: Callable[[nn.Module], TwinMode]) -> None:
        super().__init__()
        self._modules = dict(model._modules)  # the same objects: the same qualified names
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._non_persistent_buffers_set = model._non_persistent_buffers_set
        # not a submodule, and under a name no child has (HF's LlamaForCausalLM has a child "model")
        self.__dict__["_graphtricks_model"] = model
        self.training = model.training
        self.mode = mode_factory(self)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.mode.start()
        with self.mode:
            out = flatten_outputs(self.__dict__["_graphtricks_model"](*inputs))
        return tuple(out) + tuple(t for _, t in self.mode.updated)


def make_twin(model: nn.Module, *, mc: bool = False) -> tuple[nn.Module, TwinMode]:
    """The twin of ``model`` (a copy, in the mode to export): a module with the model's qualified
    parameter and buffer names whose forward is the model's under :class:`TwinMode`.

    The forward takes the inputs positionally and returns a flat tuple: the model's output
    tensors (:func:`~graphtricks.onnx.eager.flatten_outputs`), then, in the train twin, the new
    running statistics (names in ``mode.updated`` after a call). Sites are registered on the twin
    as they are first used: run it once eagerly before tracing, so that the tracer knows them.

    Args:
        model: The copy; it is called, not changed (its buffers are not written).
        mc: The MC-dropout twin (the copy is in eval mode).

    Returns:
        The twin, and its mode.
    """
    twin = _Twin(model, lambda root: TwinMode(root, mc=mc))
    return twin, twin.mode


def updated_names(mode: TwinMode) -> list[str]:
    """The graph output names of a twin's running statistics, after a call."""
    return [f"{UPDATED_PREFIX}{name}" for name, _ in mode.updated]
