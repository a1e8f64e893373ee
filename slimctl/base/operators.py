"""How a layer reads a constant: its own operator with other weights, and the maps constants become.

`layer_operator` runs a conv's (or Linear's) own forward — groups, stride, dilation, padding and
padding mode, timm's run-time 'same' padding — with a weight of the caller's and no bias; pruning
computes every removed constant's response with it (`slimctl.core.compensate`), so no layer type
needs a formula of its own. `zero_padded` says whether a constant map can leave a layer uneven over
space; `profile_map` rebuilds what stride-1 zero-padded average pools make of a constant.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

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


def profile_map(profile: Sequence[Sequence[int]], out_hw: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """[1, 1, H, W]: the stride-1 zero-padded average pools `profile` ((kh, kw, ph, pw) each, in
    order) applied to an all-ones map, for pools whose last output is `out_hw` (a stride-1 pool's
    input is its output plus 2p − k + 1 smaller, so the start size follows). Plain ints, not a
    tensor: a forward never reads a tensor's values (torch.export and ONNX export cannot)."""
    h, w = out_hw
    for kh, kw, ph, pw in profile:
        h, w = h - 2 * ph + kh - 1, w - 2 * pw + kw - 1
    result = torch.ones(1, 1, h, w, device=like.device, dtype=like.dtype)
    for kh, kw, ph, pw in profile:
        result = nn.functional.avg_pool2d(result, (kh, kw), 1, (ph, pw), count_include_pad=True)
    return result


def kernel_response(layer: nn.Module, kernel: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """[out, H_out, W_out]: `layer`'s own operator with a reduced kernel [out, kh, kw] (one input
    channel per group) on the one-channel map `shape` [1, 1, H, W], which every group reads alike."""
    groups = getattr(layer, "groups", 1)
    return layer_operator(layer, kernel.unsqueeze(1), shape.expand(1, groups, *shape.shape[-2:]))[0]


def reads_alike(layer: nn.Module) -> bool:
    """Whether `layer` turns a constant input map into one value per output channel, the same at
    every position: a Linear, or a plain Conv2d (torch's own forward) without zero padding."""
    if isinstance(layer, nn.Linear):
        return True
    return type(layer).forward is nn.Conv2d.forward and not zero_padded(layer)


def pointwise(layer: nn.Module) -> bool:
    """Whether `layer` is a plain 1×1 Conv2d (torch's own forward, one group, no padding): on a 1×1
    input it is a matrix product."""
    return (type(layer).forward is nn.Conv2d.forward and layer.kernel_size == (1, 1) and layer.groups == 1
            and layer.padding in ((0, 0), "valid"))
