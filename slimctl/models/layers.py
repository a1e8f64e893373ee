"""Layers and shape helpers shared by every family (and by surgery).

A pruned model differs from its full-width twin only in the sizes of some Conv2d, BatchNorm2d,
Linear and ChannelSelection modules. `module_widths` records those sizes by module name and
`apply_widths` rebuilds them, so a checkpoint needs no pickled classes to restore its model.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from slimctl.errors import SlimctlError
from slimctl.base.groups import ChannelGroup, Consumer
from slimctl.base.gates import GATE, GateRows
from slimctl.base.inserted import COMPENSATE, SELECT, ChannelSelection, ConstantResponse


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def scale_width(channels: int, width: float) -> int:
    """A width multiplier that never leaves a layer with zero channels."""
    return max(1, int(round(channels * width)))


def init_paper_weights(model: nn.Module) -> None:
    """The paper's init: conv N(0, sqrt(2 / (k²·C_out))), BN γ = 0.5 (a mid-range start for the L1
    penalty), β = 0, Linear N(0, 0.01), bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 0.5)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


class PreActHead(nn.Module):
    """`bn → select → relu → global average pool → fc`: the classifier of the pre-activation nets.

    The BN sits on the full-width stream, so it prunes through its selection (fc reads the kept
    channels). The reference pools with AvgPool2d(8) on 8×8 maps; the adaptive pool is the same on
    32×32 inputs (64 FLOPs per output) and still ends at 1×1 on other sizes, so fc reads one column
    per channel. A module, as in the reference, so the FLOP counter sees it.
    """

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.select = ChannelSelection(channels)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.relu(self.select(self.bn(x)))), 1))

    def channel_group(self, name: str) -> ChannelGroup:
        """The head's one group, for a head registered as `name` in its model."""
        return ChannelGroup(bn=f"{name}.bn", consumers=(Consumer(f"{name}.fc"),), selection=f"{name}.select")


def module_shape(module: nn.Module) -> list[int] | None:
    """The sizes pruning can change, or None for modules pruning never resizes."""
    if isinstance(module, nn.Conv2d):
        return [module.in_channels, module.out_channels, module.groups]
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):  # SyncBatchNorm: train.sync_bn
        return [module.num_features]
    if isinstance(module, nn.Linear):
        return [module.in_features, module.out_features]
    if isinstance(module, ChannelSelection):
        return [module.indices.numel()]
    if isinstance(module, (ConstantResponse, GateRows)):
        return module.shape
    return None


def module_widths(model: nn.Module) -> dict[str, list[int]]:
    """Module name → resizable shape, for every Conv2d/BatchNorm2d/Linear/ChannelSelection/ConstantResponse/GateRows."""
    widths = {}
    for name, module in model.named_modules():
        shape = module_shape(module)
        if shape is not None:
            widths[name] = shape
    return widths


_PLAIN = (nn.Conv2d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Linear)


def _resized_subclass(module: nn.Module, shape: list[int]) -> nn.Module:
    """A subclass of Conv2d / BatchNorm2d / Linear (timm's BatchNormAct2d, Conv2dSame, …) resized in
    a copy, so what the subclass adds (its act and drop children, its padding rule) stays intact.
    Like a fresh module it has new (reset) parameters and none of slimctl's inserted children or hooks."""
    new = copy.deepcopy(module)
    for child in (SELECT, COMPENSATE, GATE):
        new._modules.pop(child, None)
    new._forward_hooks.clear()
    new._forward_pre_hooks.clear()
    if isinstance(new, nn.Conv2d):
        new.in_channels, new.out_channels, new.groups = shape
        new.weight = nn.Parameter(torch.empty(shape[1], shape[0] // shape[2], *new.kernel_size))
        if new.bias is not None:
            new.bias = nn.Parameter(torch.empty(shape[1]))
    elif isinstance(new, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        new.num_features = n = shape[0]
        if new.affine:
            new.weight, new.bias = nn.Parameter(torch.empty(n)), nn.Parameter(torch.empty(n))
        if new.track_running_stats:
            new.running_mean, new.running_var = torch.zeros(n), torch.ones(n)
    else:
        new.in_features, new.out_features = shape
        new.weight = nn.Parameter(torch.empty(shape[1], shape[0]))
        if new.bias is not None:
            new.bias = nn.Parameter(torch.empty(shape[1]))
    new.reset_parameters()
    return new


def resized(module: nn.Module, shape: list[int]) -> nn.Module:
    """A fresh module like `module` (same kernel, stride, eps, …; a subclass keeps what it adds)
    with the sizes in `shape`."""
    device = next(iter(module.parameters()), next(iter(module.buffers()), torch.empty(0))).device
    if isinstance(module, _PLAIN) and type(module) not in _PLAIN:
        new = _resized_subclass(module, shape)
    elif isinstance(module, nn.Conv2d):
        in_c, out_c, groups = shape
        new = nn.Conv2d(
            in_c, out_c, module.kernel_size, stride=module.stride, padding=module.padding,
            dilation=module.dilation, groups=groups, bias=module.bias is not None,
            padding_mode=module.padding_mode,
        )
    elif isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        new = type(module)(
            shape[0], eps=module.eps, momentum=module.momentum, affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
    elif isinstance(module, nn.Linear):
        new = nn.Linear(shape[0], shape[1], bias=module.bias is not None)
    elif isinstance(module, ChannelSelection):
        new = ChannelSelection(shape[0])
    elif isinstance(module, (ConstantResponse, GateRows)):
        new = type(module)(*shape)
    else:
        raise TypeError(f"cannot resize {type(module).__name__}")
    # Same device and float dtype as the original (`.to(dtype)` leaves integer buffers alone).
    floats = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    return new.to(device=device, dtype=floats[0].dtype if floats else None)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_widths(model: nn.Module, widths: dict[str, list[int]]) -> None:
    """Resize, in place, every module whose recorded shape differs from the model's."""
    modules = dict(model.named_modules())
    for name, shape in widths.items():
        module = modules.get(name)
        current = module_shape(module) if module is not None else None
        if current is None:
            raise SlimctlError(
                f"checkpoint widths name module {name!r}, which this model does not have "
                "(or cannot resize); the checkpoint does not match its arch"
            )
        smallest = 0 if isinstance(module, (ConstantResponse, GateRows)) else 1  # a kernel may be empty (0×0)
        if len(shape) != len(current) or not all(isinstance(s, int) and s >= smallest for s in shape):
            raise SlimctlError(f"checkpoint widths for {name!r} are malformed: {shape!r}")
        if list(shape) != current:
            replace_module(model, name, resized(module, list(shape)))
