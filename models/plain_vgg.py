"""A plain VGG-style CNN whose stages are ``nn.Sequential`` children: the residual pass's example.

``stages.0`` keeps 32 channels at 32x32, ``stages.1`` and ``stages.2`` double the channels and
halve the size with a stride-2 first conv, so ``--residual 'stages.*'`` meets an identity, and
two downsampling shortcuts. About 0.3 M parameters; inputs ``(N, 3, 32, 32)``.
"""

from torch import nn


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class PlainVGG(nn.Module):
    """Stem, three Conv-BN-ReLU stages (``stages.0`` … ``stages.2``), pooled linear head.

    Args:
        widths: channels of each stage; every stage after the first halves the spatial size.
        depth: Conv-BN-ReLU layers per stage.
        num_classes: logits out.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), depth: int = 2, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(3, widths[0]))
        stages = []
        cin = widths[0]
        for i, width in enumerate(widths):
            layers = _conv_bn_relu(cin, width, stride=1 if i == 0 else 2)
            for _ in range(depth - 1):
                layers += _conv_bn_relu(width, width)
            stages.append(nn.Sequential(*layers))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.stages(self.stem(x))).flatten(1))


__all__ = ["PlainVGG"]
