"""Re-estimating BatchNorm running statistics after pruning: forward passes only, no labels.

Why: a removed channel whose γ had not reached zero still carried signal, so every BN after it
now sees inputs with another mean and variance than the ones its running statistics were
averaged over during training. Passing a few thousand training images through the pruned
network, with the BN layers (only) in training mode, replaces those statistics. No weight is
trained: there is no loss, no gradient and no label, and the images pass once. This is the
"adaptive BN" step of EagleEye (Li et al., ECCV 2020); slimctl runs it only when asked
(`prune --recalibrate N`, `sweep --recalibrate N`), because it reads the training split.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from slimctl.base.device import autocast


def recalibrate_bn(model: nn.Module, loader, *, device: torch.device, dtype: torch.dtype | None = None) -> int:
    """Replace every BN's running mean/var by their average over one pass of `loader`; → images seen.

    Each batch counts equally (cumulative averaging, momentum None), whatever the recorded
    momentum, which is restored afterwards. Dropout and everything else stay in eval mode, so only
    the statistics change. The model is left in eval mode.
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    model.eval()
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
        layer.train()
    images = 0
    try:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(0)  # the same (seeded) crops and flips on every call
        with torch.no_grad():
            for x, _ in loader:
                with autocast(device, dtype):
                    model(x)
                images += len(x)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.eval()
    return images


class Recalibrator:
    """`recalibrate_bn` over one fixed loader (built once, used for every model it is called on);
    `images` is how many images it holds (fewer than asked when the split is smaller)."""

    def __init__(self, loader, device: torch.device, dtype: torch.dtype | None) -> None:
        self.loader, self.device, self.dtype = loader, device, dtype
        self.images = loader.dataset_size

    def __call__(self, model: nn.Module) -> int:
        return recalibrate_bn(model.to(self.device), self.loader, device=self.device, dtype=self.dtype)
