"""The models of the evidence gallery: small, plain, and written the way people write them.

Each is the "before" model; graphtricks rewrites it for the "after" side.
"""

from __future__ import annotations

import torch
from torch import nn


class WideMLP(nn.Module):
    """64 → 512 → 512 → 10 with ReLU: big enough to memorise 300 noisy images."""

    def __init__(self, width: int = 512, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.body(x))


class DeepPlainMLP(nn.Module):
    """``depth`` blocks of Linear(64, 64) + ReLU, no normalisation: too deep to train plainly.

    ``std`` draws every weight from N(0, std²) (None keeps PyTorch's default init).
    """

    def __init__(self, depth: int = 30, width: int = 64, classes: int = 10, std: float | None = None):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)])
        self.head = nn.Linear(width, classes)
        if std is not None:
            with torch.no_grad():
                for m in self.modules():
                    if isinstance(m, nn.Linear):
                        m.weight.normal_(0.0, std)
                        m.bias.zero_()

    def forward(self, x):
        return self.head(self.blocks(x))


def deep_plain_normal():
    """DeepPlainMLP with N(0, 1) weights: the naive init that explodes with depth."""
    return DeepPlainMLP(std=1.0)


class BNMLP(nn.Module):
    """64 → 128 → 128 → 10 with BatchNorm1d + ReLU after each hidden Linear."""

    def __init__(self, width: int = 128, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, width), nn.BatchNorm1d(width), nn.ReLU(),
                                  nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU())
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.body(x))


def deep_residual():
    """DeepPlainMLP with an identity shortcut around each block, made by graphtricks (the warmup/clip baseline)."""
    import graphtricks as gt

    plain = DeepPlainMLP()
    result = gt.rewrite(plain, [gt.AddResidual(["blocks.*"], shortcut="identity")], example_inputs=(torch.randn(8, 64),))
    return result.model


def wide_mlp_5():
    """WideMLP with 5 outputs: trained on digits 0–4 only (the MC-dropout panel holds 5–9 out)."""
    return WideMLP(classes=5)


def deep_plain(depth: int):
    """A factory of DeepPlainMLP at ``depth`` (PyTorch's default init), named after it."""
    def build():
        return DeepPlainMLP(depth=depth)
    build.__name__ = f"DeepPlainMLP{depth}"
    return build
