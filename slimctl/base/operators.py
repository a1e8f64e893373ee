"""How a layer reads a constant: its own operator with other weights, and the maps constants become.

`layer_operator` runs a conv's (or Linear's) own forward — groups, stride, dilation, padding and
padding mode, timm's run-time 'same' padding — with a weight of the caller's and no bias; pruning
computes every removed constant's response with it (`slimctl.core.compensate`), so no layer type
needs a formula of its own. `zero_padded` says whether a constant map can leave a layer uneven over
space; `profile_map` rebuilds what stride-1 zero-padded average pools make of a constant.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def layer_operator(layer: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What `layer` computes on `x` with `weight` in place of its own and no bias, by its own forward
    (groups, stride, dilation, padding and padding mode, timm's run-time 'same' padding), its hooks
    left out. How compensation computes a removed constant's response: no per-op formula to keep."""
    if isinstance(layer, nn.Linear):
        return nn.functional.linear(x, weight)
    if type(layer).forward is nn.Conv2d.forward:
        return layer._conv_forward(x, weight, None)
    twin = copy.copy(layer)  # a subclass with a forward of its own: run it on a twin holding `weight`
    object.__setattr__(twin, "_parameters", {"weight": weight, "bias": None})
    return type(layer).forward(twin, x)


def zero_padded(layer: nn.Module) -> bool:
    """Whether a constant input map can leave `layer` uneven over space: a conv whose zero padding
    (static, 'same', or timm's run-time 'same') reaches the kernel. Other padding modes repeat the
    constant; a Linear or an unpadded conv reads it everywhere alike."""
    if not isinstance(layer, nn.Conv2d) or all(k == 1 for k in layer.kernel_size):
        return False
    if type(layer).__name__ == "Conv2dSame":
        return True
    if layer.padding_mode != "zeros":
        return False
    if isinstance(layer.padding, str):  # "valid" pads nothing
        return layer.padding == "same"
    return any(p != 0 for p in layer.padding)


def profile_map(profile: torch.Tensor, out_hw: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """[1, 1, H, W]: the stride-1 zero-padded average pools `profile` ([n, 4]: kh, kw, ph, pw, in
    order) applied to an all-ones map, for pools whose last output is `out_hw` (a stride-1 pool's
    input is its output plus 2p − k + 1 smaller, so the start size follows)."""
    rows = [tuple(int(v) for v in row) for row in profile.tolist()]
    h, w = out_hw
    for kh, kw, ph, pw in rows:
        h, w = h - 2 * ph + kh - 1, w - 2 * pw + kw - 1
    result = torch.ones(1, 1, h, w, device=like.device, dtype=like.dtype)
    for kh, kw, ph, pw in rows:
        result = nn.functional.avg_pool2d(result, (kh, kw), 1, (ph, pw), count_include_pad=True)
    return result
