"""Pre-activation bottleneck ResNet for 32×32 inputs (ResNet-164), as in the network-slimming code.

depth = 9n + 2: a 3×3 stem conv (3 → 16, no BN after it), then 3 stages of n bottlenecks with
planes 16/32/64 (expansion 4, so the residual stream is 64/128/256 wide), then the head
`bn → select → relu → avgpool 8 → fc`. A bottleneck is

    bn1 → select → relu → conv1 1×1 → bn2 → relu → conv2 3×3 (stride) → bn3 → relu → conv3 1×1
    + downsample (1×1 strided conv, no BN) on each stage's first block, else the identity.

Module names: `stem`, `layer{1,2,3}.{i}.{bn1,select,relu,conv1,bn2,conv2,bn3,conv3,downsample}`,
`head.{bn,select,relu,avgpool,fc}`.

What pruning may touch: bn1 and the head BN sit on the residual stream, which every block reads
whole, so they keep their width and a `ChannelSelection` passes only their kept channels on to
conv1 (or fc). bn2 and bn3 are free: conv1/conv2 lose output channels, conv2/conv3 input channels.
The stream itself (stem, conv3 outputs, downsample) never changes width.
"""

from __future__ import annotations

import torch
from torch import nn

from slimctl.errors import SlimctlError
from slimctl.base.inserted import ChannelSelection
from slimctl.models.layers import PreActHead, init_paper_weights, scale_width
from slimctl.base.groups import ChannelGroup, Consumer
from slimctl.base.registry import register_model

EXPANSION = 4
PLANES = (16, 32, 64)  # bottleneck widths of the three stages; outputs are 4× these
STEM = 16


class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * EXPANSION
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.select = ChannelSelection(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        # The shortcut reads the raw (un-normalised) block input, as in the reference code.
        self.downsample = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.select(self.bn1(x))))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class PreResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 11 or (depth - 2) % 9 != 0:
            raise SlimctlError(f"preresnet depth must be 9n + 2 with n >= 1 (11, 20, 29, …, 56, …, 164), got {depth}")
        blocks = (depth - 2) // 9
        channels = scale_width(STEM, width)
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        for stage, planes in enumerate(PLANES, start=1):
            planes = scale_width(planes, width)
            layers = []
            for i in range(blocks):
                stride = 2 if stage > 1 and i == 0 else 1
                layers.append(Bottleneck(channels, planes, stride))
                channels = planes * EXPANSION
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.head = PreActHead(channels, num_classes)
        init_paper_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer3(self.layer2(self.layer1(self.stem(x)))))

    def blocks(self) -> list[tuple[str, Bottleneck]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, Bottleneck)]

    def channel_groups(self) -> list[ChannelGroup]:
        """Per block: bn1 through its selection (→ conv1), bn2 (conv1 → conv2) and bn3 (conv2 → conv3)
        free; the head BN through its selection (→ fc: the map is 1×1 after the pool, so repeat 1)."""
        groups = []
        for name, _ in self.blocks():
            groups += [
                ChannelGroup(bn=f"{name}.bn1", consumers=(Consumer(f"{name}.conv1"),), selection=f"{name}.select"),
                ChannelGroup(
                    bn=f"{name}.bn2", producers=(f"{name}.conv1", f"{name}.bn2"), consumers=(Consumer(f"{name}.conv2"),)
                ),
                ChannelGroup(
                    bn=f"{name}.bn3", producers=(f"{name}.conv2", f"{name}.bn3"), consumers=(Consumer(f"{name}.conv3"),)
                ),
            ]
        groups.append(self.head.channel_group("head"))
        return groups


@register_model("preresnet")
def preresnet(num_classes: int, width: float = 1.0, depth: int = 164) -> PreResNet:
    return PreResNet(depth, num_classes, width)


@register_model("resnet164")
def resnet164(num_classes: int, width: float = 1.0) -> PreResNet:
    return PreResNet(164, num_classes, width)


@register_model("preresnet56")
def preresnet56(num_classes: int, width: float = 1.0) -> PreResNet:
    return PreResNet(56, num_classes, width)
