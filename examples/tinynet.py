"""A user's own CNN in its own file: residual blocks, a concatenation and a squeeze-and-excitation
gate — the constructs whose channels are coupled. slimctl knows nothing of this file; it finds the
channel groups by tracing the model.

    slimctl sparse-train -c examples/tinynet.yaml -o runs/tinynet     (model.arch: tinynet:TinyNet)
    python examples/own_loop.py                                       (Slimming in a plain loop)
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Residual(nn.Module):
    """x + f(x): the block's output channels are tied to its input's (a coupled set)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class SqueezeExcite(nn.Module):
    """x · σ(W₂ relu(W₁ mean(x))): a per-channel gate computed from the channels it scales."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, max(1, channels // reduction), 1)
        self.expand = nn.Conv2d(max(1, channels // reduction), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return x * gate


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = conv_bn(3, width)
        self.residual = Residual(width)
        self.left, self.right = conv_bn(width, width), conv_bn(width, width // 2)
        joined = width + width // 2  # the concatenation of left and right
        self.se = SqueezeExcite(joined)
        self.down = conv_bn(joined, 2 * width, stride=2)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.residual(self.stem(x))
        x = self.se(torch.cat([self.left(x), self.right(x)], dim=1))
        return self.head(self.down(x).mean((2, 3)))
