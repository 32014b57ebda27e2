"""Activations in every form: functional, method, in-place, and a sigmoid head."""

import torch
import torch.nn.functional as F
from torch import nn


class FunctionalActs(nn.Module):
    """A CNN whose activations are written as functions and tensor methods.

    Ends with a sigmoid whose output is the model output: no dropout may follow it.
    """

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, 1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        y = self.conv3(x)
        y.relu_()  # in-place: later readers of y see the activated value
        x = F.leaky_relu(y + x, 0.2)
        x = x.mean(dim=(2, 3))
        x = self.fc1(x).sigmoid()
        return torch.sigmoid(self.fc2(x))
