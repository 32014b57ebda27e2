"""The PyTorch side of random draws (stochastic depth and the like): record them, make them fixed.

timm ``DropPath`` and torchvision ``StochasticDepth`` draw a per-sample keep mask with
``Tensor.bernoulli_(keep_prob)`` and divide it by ``keep_prob``; the TorchScript exporter turns
each such draw into ``RandomUniformLike -> Less(u, keep_prob)``. A deterministic comparison
needs both sides to take the same draw, so each draw takes a *fixed value*: a uniform draw
its lower bound (0), a normal draw its mean (0), and a Bernoulli draw with probability p the
value ``0 < p`` (what ``u < p`` gives for ``u = 0``: a stochastic-depth sample is kept).
``graphtricks.onnx.train_only.deterministic_train_copy`` does the same to the ONNX random
operators. Everything computed from the draw (the ``1 / keep_prob`` scaling included) still
runs on both sides and is compared, which a "skip the random part" (``p = 0``) twin would not do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DRAW_FUNCTIONS", "Draw", "call_argument", "draw"]


@dataclass(frozen=True)
class Draw:
    """One random draw a forward made.

    Attributes:
        kind: ``"bernoulli"``, ``"uniform"`` or ``"normal"``.
        p: For a Bernoulli draw with one probability for every element, that probability
            (of a 1: the keep probability of stochastic depth); ``None`` otherwise.
    """

    kind: str
    p: float | None = None


def call_argument(args: Sequence, kwargs: dict, name: str, index: int, default: Any) -> Any:
    """A call's argument by keyword, else by position, else ``default``."""
    if name in kwargs:
        return kwargs[name]
    return args[index] if 0 <= index < len(args) else default


def _scalar(p: Any) -> float | None:
    """A probability given as a number or a one-element tensor, else None."""
    if isinstance(p, torch.Tensor):
        return float(p) if p.numel() == 1 else None
    return float(p) if isinstance(p, (int, float)) and not isinstance(p, bool) else None


def _bernoulli_inplace(func: Callable, args: Sequence, kwargs: dict, fixed: bool) -> tuple:
    """``Tensor.bernoulli_(p=0.5)``: fills ``self`` with ``0 < p`` when fixed."""
    p = call_argument(args, kwargs, "p", 1, 0.5)
    record = Draw("bernoulli", _scalar(p))
    if not fixed:
        return record, func(*args, **kwargs)
    self = args[0]
    if isinstance(p, torch.Tensor):
        return record, self.copy_(torch.gt(p, 0).to(self.dtype).expand_as(self))
    return record, self.fill_(float(p > 0))


def _bernoulli(func: Callable, args: Sequence, kwargs: dict, fixed: bool) -> tuple:
    """``torch.bernoulli(input)`` (probabilities in ``input``) or ``bernoulli(input, p)``."""
    source = args[0] if args else kwargs["input"]
    p = call_argument(args, kwargs, "p", 1, None)
    record = Draw("bernoulli", _scalar(p) if p is not None else None)
    if not fixed:
        return record, func(*args, **kwargs)
    if p is None:
        return record, torch.gt(source, 0).to(source.dtype)
    return record, torch.full_like(source, float(_scalar(p) > 0))


def _zeroed(kind: str) -> Callable:
    """``rand``/``randn`` and their ``_like`` twins: the draw, then zeros when fixed."""

    def handle(func: Callable, args: Sequence, kwargs: dict, fixed: bool) -> tuple:
        out = func(*args, **kwargs)
        return Draw(kind), out.zero_() if fixed else out

    return handle


# The entry points through which model code draws random numbers that the TorchScript exporter
# turns into ONNX random operators, as seen by a TorchFunctionMode. Draws made inside C++
# kernels (dropout, rrelu) are not seen: dropout is handled on its own.
DRAW_FUNCTIONS: dict[Any, Callable] = {
    torch.Tensor.bernoulli_: _bernoulli_inplace,
    torch.Tensor.bernoulli: _bernoulli,
    torch.bernoulli: _bernoulli,
    torch.rand: _zeroed("uniform"),
    torch.rand_like: _zeroed("uniform"),
    torch.randn: _zeroed("normal"),
    torch.randn_like: _zeroed("normal"),
}


def draw(func: Callable, args: Sequence, kwargs: dict, fixed: bool) -> tuple[Draw, Any]:
    """Runs one random-draw function; if ``fixed``, its result takes the fixed value.

    Args:
        func: A key of :data:`DRAW_FUNCTIONS`.
        args: Its positional arguments.
        kwargs: Its keyword arguments.
        fixed: Whether to replace the random result with the fixed one.

    Returns:
        What was drawn, and the function's result.
    """
    return DRAW_FUNCTIONS[func](func, args, kwargs, fixed)
