"""A multilayer perceptron with BatchNorm on vectors."""

from torch import nn


class MLP(nn.Module):
    """Linear-BN-GELU layers on (N, in_features) vectors."""

    def __init__(self, in_features: int = 32, hidden: int = 64, depth: int = 3, out_features: int = 10):
        super().__init__()
        layers = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.GELU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, out_features)

    def forward(self, x):
        return self.out(self.body(x))


def mlp_factory(depth: int = 2):
    """A zero-argument factory (the spec ``models/mlp.py:mlp_factory``)."""
    return MLP(depth=depth)
