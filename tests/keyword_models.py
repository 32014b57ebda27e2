"""Models that take their inputs by keyword, shared by the capture, folder and export tests."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["KwOnly", "Mixed", "SPEC_DIR"]

SPEC_DIR = __file__  # model specs name this file: f"{SPEC_DIR}:KwOnly"


class KwOnly(nn.Module):
    """A forward that takes its inputs by keyword only, one of them optional."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, *, x, mask=None):
        h = torch.relu(self.bn(self.fc1(x)))
        if mask is not None:
            h = h * mask
        return self.fc2(h)


class Mixed(nn.Module):
    """A positional input and a keyword one."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, scale=None):
        y = self.fc(x)
        return y * scale if scale is not None else y
