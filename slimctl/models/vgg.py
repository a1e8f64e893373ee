"""VGG for 32×32 inputs, as in the network-slimming code: plain data widths, one builder.

Every number is a 3×3 conv (pad 1, no bias) + BN + ReLU; "M" is a 2×2 max-pool. After the last
conv (2×2 maps on CIFAR) come a 2×2 average pool and one Linear. Modules are named
`features.conv{i}/bn{i}/relu{i}/pool{j}` and `classifier`, so channel groups match by name.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

from slimctl.models.layers import init_paper_weights, scale_width
from slimctl.base.groups import ChannelGroup, Consumer
from slimctl.base.registry import register_model

WIDTHS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class VGG(nn.Module):
    def __init__(self, widths: list[int | str], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        conv_index = pool_index = 0
        channels = in_channels
        for item in widths:
            if item == "M":
                layers[f"pool{pool_index}"] = nn.MaxPool2d(kernel_size=2, stride=2)
                pool_index += 1
                continue
            layers[f"conv{conv_index}"] = nn.Conv2d(channels, int(item), 3, padding=1, bias=False)
            layers[f"bn{conv_index}"] = nn.BatchNorm2d(int(item))
            layers[f"relu{conv_index}"] = nn.ReLU(inplace=True)
            channels = int(item)
            conv_index += 1
        self.num_convs = conv_index
        self.features = nn.Sequential(layers)
        self.classifier = nn.Linear(channels, num_classes)
        init_paper_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 2×2 → 1×1 on 32×32 inputs (the reference's avg_pool2d(2)), and 1×1 on any other size.
        # Functional, as in the reference code, whose FLOP counter therefore never saw this pool:
        # that is how the paper's 797,304,842 comes out.
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))

    def channel_groups(self) -> list[ChannelGroup]:
        """Each conv/BN pair is a free space: conv rows + BN shrink; the next conv (or the head) reads fewer."""
        groups = []
        for i in range(self.num_convs):
            last = i == self.num_convs - 1
            # After the last conv the map is 1×1, so one channel is one Linear column.
            consumer = Consumer("classifier") if last else Consumer(f"features.conv{i + 1}")
            groups.append(
                ChannelGroup(
                    bn=f"features.bn{i}",
                    producers=(f"features.conv{i}", f"features.bn{i}"),
                    consumers=(consumer,),
                )
            )
        return groups


def _build(name: str, num_classes: int, width: float) -> VGG:
    widths = [w if w == "M" else scale_width(int(w), width) for w in WIDTHS[name]]
    return VGG(widths, num_classes)


@register_model("vgg11")
def vgg11(num_classes: int, width: float = 1.0) -> VGG:
    return _build("vgg11", num_classes, width)


@register_model("vgg13")
def vgg13(num_classes: int, width: float = 1.0) -> VGG:
    return _build("vgg13", num_classes, width)


@register_model("vgg16")
def vgg16(num_classes: int, width: float = 1.0) -> VGG:
    return _build("vgg16", num_classes, width)


@register_model("vgg19")
def vgg19(num_classes: int, width: float = 1.0) -> VGG:
    return _build("vgg19", num_classes, width)
