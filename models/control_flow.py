"""A model fx cannot trace at the top level: data-dependent control flow around plain blocks."""

from torch import nn


class Block(nn.Module):
    """A traceable Conv-BN-ReLU block."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class DataDependent(nn.Module):
    """Runs its second block only when the first block's output has a positive mean."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = Block(3, width)
        self.extra = Block(width, width)
        self.head = nn.Linear(width, 4)
        self.act = nn.Tanh()

    def forward(self, x):
        x = self.stem(x)
        if x.mean() > 0:  # depends on the data: fx cannot trace this
            x = self.extra(x)
        return self.head(self.act(x.mean(dim=(2, 3))))


__all__ = ["Block", "DataDependent"]
