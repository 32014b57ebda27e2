"""One training run: a model, the data, a :class:`TrainConfig` and a seed → per-epoch history.

The seed fixes everything random in the run (dropout masks via ``torch.manual_seed``, the
order of batches via a generator of its own), so the same seed gives the same numbers and
every variant of an experiment sees the same batches in the same order.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from graphtricks.experiment.data import Dataset
from graphtricks.experiment.techniques import (
    TrainConfig,
    autocast,
    clip,
    lr_factor,
    make_optimizer,
    multi_head_loss,
    penalty,
)

__all__ = ["batches", "evaluate", "first_head", "train"]


def first_head(outputs) -> torch.Tensor:
    """The output accuracy is read from: the tensor, or a multi-head model's first output."""
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches for one epoch; a last batch of one example is dropped (BatchNorm needs two)."""
    order = torch.randperm(n, generator=generator)
    out = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(out) > 1 and len(out[-1]) < 2:
        out.pop()
    return out


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> tuple[float, float, torch.Tensor]:
    """Eval-mode cross-entropy, accuracy and softmax probabilities of the first head on ``x``."""
    was_training = model.training
    model.eval()
    try:
        logits = torch.cat([first_head(model(x[i:i + chunk])).float() for i in range(0, len(x), chunk)])
    finally:
        model.train(was_training)
    loss = F.cross_entropy(logits, y).item()
    acc = (logits.argmax(1) == y).float().mean().item()
    return loss, acc, torch.softmax(logits, 1)


def train(model: nn.Module, data: Dataset, config: TrainConfig, seed: int,
          progress: Callable[[str], None] | None = None, label: str = "", steps: bool = False) -> dict[str, Any]:
    """Train ``model`` in place and return its history.

    Args:
        model: a model whose first output gives ``data.n_classes`` logits.
        data: the data, in the layout the model takes.
        config: the loop's settings and techniques.
        seed: fixes dropout masks and batch order.
        progress: called with one line per epoch.
        label: names the run in progress lines.
        steps: also keep the training loss of every step (``"step_loss"``, train mode, NaN once diverged).

    Returns:
        ``{"train_loss", "train_acc", "val_loss", "val_acc"}`` (one value per epoch, measured in
        eval mode with plain cross-entropy so variants compare), ``"val_probs"`` (last epoch),
        ``"diverged"`` (the step at which the loss stopped being finite, or None) and ``"seconds"``.
    """
    started = time.process_time()
    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model, config)
    steps_per_epoch = len(batches(len(data.x_train), config.batch_size, torch.Generator().manual_seed(0)))
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(
        config.schedule, warmup=config.warmup, steps_per_epoch=steps_per_epoch, total=total,
        step_size=config.step_size, gamma=config.gamma))
    history: dict[str, Any] = {k: [] for k in ("train_loss", "train_acc", "val_loss", "val_acc")}
    step_loss: list[float] = []
    diverged = None
    step = 0
    model.train()
    for epoch in range(config.epochs):
        for index in batches(len(data.x_train), config.batch_size, order):
            if diverged is not None:
                break
            with autocast(config.precision):
                outputs = model(data.x_train[index])
            loss = multi_head_loss(outputs, data.y_train[index], weights=config.loss_weights,
                                   smoothing=config.label_smoothing)
            loss = loss + penalty(model, l1=config.l1, l2=config.l2, layers=config.penalty_layers)
            value = loss.item()
            if steps:
                step_loss.append(value if math.isfinite(value) else math.nan)
            if not math.isfinite(value):
                diverged = step
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_norm is not None:
                clip(model, config.clip_norm)
            optimizer.step()
            scheduler.step()
            step += 1
        train_loss, train_acc, _ = evaluate(model, data.x_train, data.y_train)
        val_loss, val_acc, probs = evaluate(model, data.x_val, data.y_val)
        for key, value in (("train_loss", train_loss), ("train_acc", train_acc), ("val_loss", val_loss), ("val_acc", val_acc)):
            history[key].append(value)
        if progress:
            note = f" (diverged at step {diverged})" if diverged is not None else ""
            progress(f"{label} epoch {epoch + 1}/{config.epochs}: train loss {train_loss:.3f}, val acc {val_acc:.3f}{note}")
    model.eval()
    if steps:
        history["step_loss"] = step_loss
    history.update(val_probs=probs, diverged=diverged, seconds=time.process_time() - started)
    return history
