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
  shaped ``(N, C, 1, ...)``. Survivors equal PyTorch's ``x * (1 / (1 - p))`` bit for bit;
- **train-mode BatchNorm** (``F.batch_norm``/``torch.batch_norm`` with ``training=True``) by batch
  statistics, ``d = x - mean``, biased ``var = mean(d * d)`` (two passes),
  ``y = d * (weight / sqrt(var + eps)) + bias``; the running statistics PyTorch would write
  (unbiased variance, the call's momentum) and ``num_batches_tracked + 1`` are returned as extra
  outputs named ``updated.<buffer>``: the exported program writes no buffer.

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

__all__ = ["SITES_ATTRIBUTE", "TwinMode", "make_twin", "updated_names"]

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
# Alpha dropout keeps the self-normalising mean and variance: no portable form is written for it
_ALPHA = (F.alpha_dropout, F.feature_alpha_dropout, torch.alpha_dropout, torch.feature_alpha_dropout)
_TORCH_LEVEL = (torch.dropout, torch.dropout_, torch.feature_dropout, torch.feature_dropout_)
_BATCH_NORMS = (F.batch_norm, torch.batch_norm)


class DropoutSite(nn.Module):
    """One dropout call of the model, as explicit random ops."""

    def forward(self, x: torch.Tensor, p: float, spatial: int | None) -> torch.Tensor:
        """``x * mask``; ``spatial`` trailing dims of the mask are 1 (channel dropout), or -1:
        all but the first two (``torch.feature_dropout``)."""
        like = x
        if spatial is not None:
            keep = 2 if spatial < 0 else max(x.dim() - spatial, 1)
            like = x[tuple([slice(None)] * keep + [slice(0, 1)] * (x.dim() - keep))]
        kept = torch.rand_like(like) >= p
        # float(1 / (1 - p)) in the data's dtype: PyTorch's own scale, so survivors match bit for bit
        return x * (kept.to(x.dtype) * (1.0 / (1.0 - p)))


class BatchNormSite(nn.Module):
    """One train-mode batch-norm call: batch statistics, and the running statistics it would write."""

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
        running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
        momentum: float, eps: float,
    ) -> tuple[torch.Tensor, ...]:
        """The normalised ``x``, then the new running mean and variance when tracked.

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
        count = x.numel() // x.shape[1]
        unbiased = var.reshape(-1) * (count / max(count - 1, 1))
        new_mean = running_mean * (1.0 - momentum) + mean.reshape(-1) * momentum
        new_var = running_var * (1.0 - momentum) + unbiased * momentum
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

    def start(self) -> None:
        """Resets the call counters and reads the buffers' names (as tracing swapped them in)."""
        self.updated, self.counts = [], {"dropout": 0, "bn": 0}
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

    def _dropout(self, x: torch.Tensor, p: float, spatial: int | None, inplace: bool = False) -> torch.Tensor:
        if self.inference:
            raise ExportError(
                "the inference graph applies dropout: the model drops out in eval mode (an fx graph "
                "traced in train mode bakes training=True in); trace it in eval mode"
            )
        # in place or not, the result is returned: writing it back into x (copy_) would add an
        # Expand to the TorchScript graph, and forwards use what dropout returns
        del inplace
        return self._site("dropout", DropoutSite)(x, p, spatial)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _ALPHA and float(call_argument(args, kwargs, "p", 1, 0.5)) > 0 and (
            self.mc or call_argument(args, kwargs, "training" if func in (F.alpha_dropout, F.feature_alpha_dropout)
                                     else "train", 2, False)
        ):
            raise NotImplementedError(f"{func.__name__} in train mode has no portable form in the twin")
        if func in _DROPOUTS:
            spatial, p_at, train_at = _DROPOUTS[func]
            p = float(call_argument(args, kwargs, "p", p_at, 0.5))
            flag = call_argument(args, kwargs, "train" if func in _TORCH_LEVEL else "training",
                                 train_at, True)
            if p > 0 and (flag or self.mc):
                inplace = func in (torch.dropout_, torch.feature_dropout_) or (
                    func not in _TORCH_LEVEL and bool(call_argument(args, kwargs, "inplace", 3, False)))
                x = args[0] if args else kwargs["input"]
                return self._dropout(x, p, spatial, inplace)
            return func(*args, **kwargs)
        if func in _BATCH_NORMS and not self.mc:
            return self._batch_norm(func, args, kwargs)
        if func is torch.Tensor.add_ and not self.mc and args and id(args[0]) in self.buffer_names:
            name = self.buffer_names[id(args[0])]
            if name.endswith("num_batches_tracked"):  # the BatchNorm about to run counts a batch
                owner = self.root.get_submodule(name.rpartition(".")[0]) if "." in name else self.root
                if getattr(owner, "momentum", 0.1) is None:  # it would read the new count back
                    raise NotImplementedError(
                        f"BatchNorm '{name.rpartition('.')[0]}' averages cumulatively (momentum=None): "
                        "the twin does not write its count back"
                    )
                step = args[1] if len(args) > 1 else kwargs.get("other", 1)
                counter = self._site("count", CounterSite, counted=False)(args[0], step)
                self.updated.append((name, counter))
                return args[0]
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
        out = site(a["input"], a["weight"], a["bias"], a["running_mean"], a["running_var"],
                   momentum, float(a["eps"]))
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
