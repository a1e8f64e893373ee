"""DenseNet for 32×32 inputs (DenseNet-40), as in the network-slimming paper.

depth = 3n + 4: a 3×3 stem conv (3 → 16), then 3 dense blocks of n layers with two transitions
between them, then the head `bn → select → relu → avgpool 8 → fc`. No bottleneck, no compression.

    layer:       bn → select → relu → conv 3×3 (→ growth), concatenated onto the layer's input
    transition:  bn → select → relu → conv 1×1 (same width) → avgpool 2

Module names: `stem`, `dense{1,2,3}.{i}.{bn,select,relu,conv}`, `trans{1,2}.{bn,select,relu,conv,pool}`,
`head.{bn,select,relu,avgpool,fc}`.

What pruning may touch: every BN reads a concatenation that later layers also read whole, so every
BN keeps its width and a `ChannelSelection` passes only its kept channels to the conv after it (or
to fc). Only conv inputs shrink; growth outputs and transition outputs keep their width.
"""

from __future__ import annotations

import torch
from torch import nn

from slimctl.errors import SlimctlError
from slimctl.base.inserted import ChannelSelection
from slimctl.models.layers import PreActHead, init_paper_weights, scale_width
from slimctl.base.groups import ChannelGroup, Consumer
from slimctl.base.registry import register_model

STEM = 16  # the paper's DenseNet-40 (1.02M params); the official PyTorch port uses 2·growth = 24


class DenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.select = ChannelSelection(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.conv(self.relu(self.select(self.bn(x))))), 1)


class Transition(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.select = ChannelSelection(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.relu(self.select(self.bn(x)))))


class DenseNet(nn.Module):
    def __init__(
        self, depth: int, num_classes: int, growth: int = 12, width: float = 1.0, in_channels: int = 3
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 7 or (depth - 4) % 3 != 0:
            raise SlimctlError(f"densenet depth must be 3n + 4 with n >= 1 (7, 10, …, 40, …), got {depth}")
        if not isinstance(growth, int) or growth < 1:
            raise SlimctlError(f"densenet growth must be a positive integer, got {growth}")
        layers_per_block = (depth - 4) // 3
        growth = scale_width(growth, width)
        channels = scale_width(STEM, width)
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        for block in (1, 2, 3):
            layers = []
            for _ in range(layers_per_block):
                layers.append(DenseLayer(channels, growth))
                channels += growth
            setattr(self, f"dense{block}", nn.Sequential(*layers))
            if block < 3:
                setattr(self, f"trans{block}", Transition(channels, channels))
        self.head = PreActHead(channels, num_classes)
        init_paper_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dense1(self.stem(x))
        x = self.dense2(self.trans1(x))
        x = self.dense3(self.trans2(x))
        return self.head(x)

    def channel_groups(self) -> list[ChannelGroup]:
        """Every BN prunes through its selection; the consumer is the conv right after it (or fc,
        after the 8×8 pool: a 1×1 map, so repeat 1)."""
        groups = []
        for name, module in self.named_modules():
            if isinstance(module, (DenseLayer, Transition)):
                groups.append(
                    ChannelGroup(bn=f"{name}.bn", consumers=(Consumer(f"{name}.conv"),), selection=f"{name}.select")
                )
        groups.append(self.head.channel_group("head"))
        return groups


@register_model("densenet")
def densenet(num_classes: int, width: float = 1.0, depth: int = 40, growth: int = 12) -> DenseNet:
    return DenseNet(depth, num_classes, growth=growth, width=width)


@register_model("densenet40")
def densenet40(num_classes: int, width: float = 1.0) -> DenseNet:
    return DenseNet(40, num_classes, width=width)
