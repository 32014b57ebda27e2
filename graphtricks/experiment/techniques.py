"""Training-loop techniques as small reusable helpers, and the settings that switch them on.

Each helper is usable in any training loop::

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor("cosine", warmup=200, total=1000))
    loss = smoothed_loss(logits, y, smoothing=0.1) + penalty(model, l2=1e-4, layers=("out*",))
    clip(model, max_norm=1.0)

A recipe names them beside graph passes (``[[passes]]`` tables whose ``pass`` is a key of
:data:`TECHNIQUES`); :func:`apply_technique` folds one such table into a :class:`TrainConfig`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from graphtricks.experiment.errors import ExperimentError

__all__ = [
    "OPTIMIZERS",
    "PRECISIONS",
    "SCHEDULES",
    "TECHNIQUES",
    "TrainConfig",
    "apply_technique",
    "autocast",
    "clip",
    "lr_factor",
    "make_optimizer",
    "multi_head_loss",
    "penalty",
    "smoothed_loss",
]

SCHEDULES = ("constant", "step", "exponential", "cosine")
OPTIMIZERS = ("adam", "sgd")
PRECISIONS = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class TrainConfig:
    """How every variant of an experiment is trained (shared), plus a recipe's own techniques.

    Attributes:
        epochs, batch_size, optimizer, lr, momentum: the plain loop.
        warmup: steps of linear LR warmup from 0. schedule: after warmup, one of SCHEDULES;
            step_size/gamma shape ``step`` (×gamma every step_size epochs) and ``exponential`` (×gamma per epoch).
        clip_norm: clip the global gradient norm to this (None: no clipping).
        label_smoothing: ε of cross-entropy's label smoothing.
        l1, l2: penalty weights on the parameters of the layers matched by ``penalty_layers`` (globs
            on qualified module names, as in the passes' include/exclude; empty: every layer).
        precision: float32, or bfloat16/float16 autocast (bfloat16 only on the CPU).
        loss_weights: weights of the losses of a multi-head model's outputs, in order.
        mc_samples: T of MC-dropout inference (0: off): after training, the uncertainty panels
            read the mean of T stochastic forwards (``gt.mc_sample``) beside the deterministic one.
    """

    epochs: int = 5
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    warmup: int = 0
    schedule: str = "constant"
    step_size: int = 1
    gamma: float = 0.5
    clip_norm: float | None = None
    label_smoothing: float = 0.0
    l1: float = 0.0
    l2: float = 0.0
    penalty_layers: tuple[str, ...] = ()
    precision: str = "float32"
    loss_weights: tuple[float, ...] = ()
    mc_samples: int = 0

    def __post_init__(self):
        checks = [
            (isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be an integer ≥ 1, got {self.epochs!r}"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch size must be an integer ≥ 1, got {self.batch_size!r}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"),
            (self.lr > 0, f"learning rate must be > 0, got {self.lr!r}"),
            (isinstance(self.warmup, int) and self.warmup >= 0, f"warmup must be a number of steps ≥ 0, got {self.warmup!r}"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}"),
            (self.step_size >= 1 and 0 < self.gamma <= 1, f"step_size must be ≥ 1 and gamma in (0, 1], got {self.step_size!r}, {self.gamma!r}"),
            (self.clip_norm is None or self.clip_norm > 0, f"clip norm must be > 0, got {self.clip_norm!r}"),
            (0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1), got {self.label_smoothing!r}"),
            (self.l1 >= 0 and self.l2 >= 0, f"l1/l2 weights must be ≥ 0, got {self.l1!r}, {self.l2!r}"),
            (self.precision in PRECISIONS, f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}"),
            (all(w >= 0 for w in self.loss_weights), f"loss weights must be ≥ 0, got {list(self.loss_weights)}"),
            (isinstance(self.mc_samples, int) and not isinstance(self.mc_samples, bool) and self.mc_samples != 1
             and self.mc_samples >= 0, f"MC dropout samples must be 0 (off) or an integer ≥ 2, got {self.mc_samples!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ExperimentError(message)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


# -- helpers ----------------------------------------------------------------------------------
def lr_factor(schedule: str = "constant", *, warmup: int = 0, steps_per_epoch: int = 1, total: int = 1,
              step_size: int = 1, gamma: float = 0.5):
    """A ``LambdaLR`` factor: linear warmup over ``warmup`` steps, then ``schedule`` per epoch.

    Args:
        schedule: constant, step (×gamma every step_size epochs), exponential (×gamma per epoch),
            cosine (to 0 at step ``total``).
        warmup: warmup steps (the factor rises from 1/warmup to 1).
        steps_per_epoch: optimiser steps per epoch. total: all optimiser steps of the run.

    Example:
        >>> f = lr_factor("cosine", warmup=10, total=100); f(0), f(9), f(100)
        (0.1, 1.0, 0.0)
    """
    if schedule not in SCHEDULES:
        raise ExperimentError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        epoch = step // max(1, steps_per_epoch)
        if schedule == "step":
            return gamma ** (epoch // step_size)
        if schedule == "exponential":
            return gamma ** epoch
        if schedule == "cosine":
            span = max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
        return 1.0

    return factor


def clip(model: nn.Module, max_norm: float | None) -> float:
    """Clip the global gradient norm of ``model`` to ``max_norm`` (None: only measure); the norm before."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm is None:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def penalty(model: nn.Module, *, l1: float = 0.0, l2: float = 0.0, layers: tuple[str, ...] | list[str] = ()) -> torch.Tensor:
    """``l1·Σ|w| + l2·Σw²`` over the weights of the modules whose qualified name matches a glob.

    Globs are matched as the passes' ``include``/``exclude`` are (``fnmatch`` on the qualified
    module name: ``out``, ``body.*``); no globs means every module. Biases and norm layers'
    parameters are left out (the usual practice for weight decay).

    Raises:
        ExperimentError: a glob matches no module with weights (say which exist).
    """
    zero = torch.zeros(())
    if not l1 and not l2:
        return zero
    chosen = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.ndim < 2:
            continue
        if layers and not any(fnmatch.fnmatchcase(name, g) for g in layers):
            continue
        chosen.append(weight)
    if not chosen:
        names = [n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), nn.Parameter)]
        raise ExperimentError(f"L1/L2 layers {list(layers)} match no layer with weights; layers are: {', '.join(names[:12])}")
    total = zero
    for w in chosen:
        if l1:
            total = total + l1 * w.abs().sum()
        if l2:
            total = total + l2 * w.pow(2).sum()
    return total


def autocast(precision: str = "float32", device: str = "cpu"):
    """A context that runs the forward in ``precision`` (autocast), or does nothing for float32.

    Raises:
        ExperimentError: float16 asked for on the CPU (use bfloat16 there).
    """
    if precision == "float32":
        return contextlib.nullcontext()
    if device == "cpu" and precision != "bfloat16":
        raise ExperimentError(f"{precision} autocast is for CUDA; on the CPU use bfloat16")
    return torch.autocast(device_type=device, dtype=getattr(torch, precision))


def smoothed_loss(logits: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy with label smoothing ε, computed in float32 whatever the autocast dtype."""
    return F.cross_entropy(logits.float(), y, label_smoothing=smoothing)


def multi_head_loss(outputs, y: torch.Tensor, *, weights: tuple[float, ...] = (), smoothing: float = 0.0) -> torch.Tensor:
    """The weighted sum of each head's loss against the same labels (one head: its loss).

    Raises:
        ExperimentError: the number of weights differs from the number of heads.
    """
    heads = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    if weights and len(weights) != len(heads):
        raise ExperimentError(f"{len(weights)} loss weights for a model with {len(heads)} output heads")
    weights = weights or (1.0,) * len(heads)
    return sum(w * smoothed_loss(h, y, smoothing) for w, h in zip(weights, heads))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser ``config`` names, over every trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
    return torch.optim.Adam(params, lr=config.lr)


# -- recipe entries -----------------------------------------------------------------------------
# technique name → {recipe key: TrainConfig field}; one table per concept.
TECHNIQUES: dict[str, dict[str, str]] = {
    "warmup": {"steps": "warmup"},
    "schedule": {"kind": "schedule", "step_size": "step_size", "gamma": "gamma"},
    "clip_grad": {"max_norm": "clip_norm"},
    "label_smoothing": {"eps": "label_smoothing"},
    "l1": {"weight": "l1", "layers": "penalty_layers"},
    "l2": {"weight": "l2", "layers": "penalty_layers"},
    "precision": {"dtype": "precision"},
    "loss_weights": {"weights": "loss_weights"},
    "optimizer": {"kind": "optimizer", "lr": "lr", "momentum": "momentum"},
    "mc_dropout": {"samples": "mc_samples"},
}


def apply_technique(config: TrainConfig, entry: dict[str, Any]) -> TrainConfig:
    """``config`` with one recipe entry (``{"pass": "label_smoothing", "eps": 0.1}``) folded in.

    Raises:
        ExperimentError: an unknown technique or key, or a value the setting rejects.
    """
    name = entry.get("pass")
    if name not in TECHNIQUES:
        raise ExperimentError(f"unknown training technique {name!r}; choose one of {', '.join(TECHNIQUES)}")
    keys = TECHNIQUES[name]
    unknown = set(entry) - {"pass"} - set(keys)
    if unknown:
        raise ExperimentError(f"{name}: unknown option(s) {', '.join(sorted(unknown))}; it takes {', '.join(keys)}")
    changes = {}
    for key, value in entry.items():
        if key == "pass":
            continue
        target = keys[key]
        changes[target] = tuple(value) if isinstance(value, list) else ([value] if target == "penalty_layers" and isinstance(value, str) else value)
    if isinstance(changes.get("penalty_layers"), list):
        changes["penalty_layers"] = tuple(changes["penalty_layers"])
    try:
        return replace(config, **changes)
    except TypeError as e:
        raise ExperimentError(f"{name}: {e}") from e
