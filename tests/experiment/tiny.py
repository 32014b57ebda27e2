"""Small models for the experiment tests (specs ``tests/experiment/tiny.py:Name``)."""

from torch import nn


class TinyMLP(nn.Module):
    """in → 32 → classes with ReLU."""

    def __init__(self, in_features: int = 64, classes: int = 10, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, width), nn.ReLU())
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.body(x))


class WineMLP(TinyMLP):
    """TinyMLP sized for scikit-learn's wine (13 features, 3 classes)."""

    def __init__(self):
        super().__init__(13, 3, 16)


class TinyBN(nn.Module):
    """Linear-BN-ReLU-Linear on wine."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(13, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x))


class DeepMLP(nn.Module):
    """64 → 16, six blocks of Linear(16, 16) + ReLU (``blocks.*``), → 10: a plain net to wrap with shortcuts."""

    def __init__(self, depth: int = 6, width: int = 16):
        super().__init__()
        self.stem = nn.Linear(64, width)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)])
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))
