"""Modules slimctl adds inside a network, each with one name, one way to insert it and one way to
find it again: `ChannelSelection` (child `select` of a BN) and `ConstantResponse` (child
`compensate` of a conv or Linear).

`ChannelSelection` passes on only the kept channels of a BN that must keep its width (the paper's
"channel selection"). The paper's pre-activation families hold one as an ordinary module; in any
other model (a traced torchvision model) slimctl adds it as the child `select` of the BN itself and
applies it with a forward hook, so the BN keeps its name and its state_dict keys (the selection adds
`<bn>.select.indices`). A checkpoint records `<bn>.select` among its widths, and `insert_recorded`
recreates the child before the weights are loaded.

`ConstantResponse` carries what removed channels still contributed: a channel whose γ ≈ 0 emits
the constant β, which the next layer reads as a bias. Pruning (`slimctl.compensate`) stores that
constant's response and adds it to the layer's output, so removal does not shift later
activations. Recorded and recreated the same way (`<layer>.compensate`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SELECT = "select"  # the child name of an inserted ChannelSelection: `<bn>.select`
COMPENSATE = "compensate"  # the child name of a ConstantResponse: `<conv or linear>.compensate`


class ChannelSelection(nn.Module):
    """Pass on only the kept channels of a BN that must keep its width (the paper's "channel selection").

    A pre-activation BN sits on a stream that other layers read at full width, so it cannot
    shrink; the conv after it reads only the kept channels. The kept indices are a buffer, not a
    Parameter: they get no gradient, are saved in the state_dict, work under DDP and torch.compile,
    and selecting is one `index_select` on the device (no host sync).
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.register_buffer("indices", torch.arange(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.indices)

    def extra_repr(self) -> str:
        return f"keeps={self.indices.numel()}"


class ConstantResponse(nn.Module):
    """The response of a layer to the constants its removed input channels emitted, added to its output.

    Two buffers: `bias` [out], a per-channel term (exact for Linear and unpadded convs, or the
    spatial mean of the exact term in `--compensate bias`), and `kernel` [out, kh, kw], the reduced
    kernel Σ_c W[o, c]·const_c over the removed channels c (empty, 0×0, when unused). Near a
    zero-padded border fewer taps see the constant, so the exact response varies with position: it
    is a conv of an all-ones map with the parent conv's stride, padding and dilation, computed for
    the output's size and cached per size, so any input size stays exact.
    """

    def __init__(self, out: int, kh: int = 0, kw: int = 0) -> None:
        super().__init__()
        self.register_buffer("bias", torch.zeros(out))
        self.register_buffer("kernel", torch.zeros(out, kh, kw))
        self._last: tuple[tuple, torch.Tensor] | None = None  # (key, map) of the last position_map

    @property
    def shape(self) -> list[int]:
        """[out, kh, kw]: what a checkpoint records to recreate it (kh = kw = 0: per channel only)."""
        return list(self.kernel.shape)

    def forward(self, output: torch.Tensor, layer: nn.Module, input_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """`output` of `layer` plus the response; `input_hw`: the layer's input H, W (per-position term).

        Added in place: the output keeps its memory format (channels_last stays channels_last) and
        no second feature map is allocated; the conv's backward does not need its output."""
        if self._buffers["kernel"].numel():
            return output.add_(self.position_map(layer, tuple(input_hw), output))
        return output.add_(self.bias.view((1, -1) + (1,) * (output.dim() - 2)).to(output.dtype))

    def position_map(self, conv: nn.Module, input_hw: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """[1, out, H_out, W_out]: bias plus the kernel term at each output position, for an input of
        `input_hw`, in the dtype and memory format of `like` (the layer's output; adding a map laid out
        like it is one aligned pass). Computed once per size, dtype and layout, then kept until any of
        those, or the buffers, change. This runs on every forward of every compensated layer, so the
        check reads plain attributes and dicts only (a buffer read through nn.Module costs ~1 µs)."""
        kernel, bias = self._buffers["kernel"], self._buffers["bias"]
        channels_last = like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last)
        key = (input_hw, like.dtype, channels_last, kernel.device, kernel._version, bias._version)
        compiling = torch.compiler.is_compiling()
        if not compiling and self._last is not None and self._last[0] == key:
            return self._last[1]
        ones = torch.ones(1, 1, *input_hw, device=kernel.device, dtype=kernel.dtype)
        result = nn.functional.conv2d(ones, kernel.unsqueeze(1), stride=conv.stride, padding=conv.padding,
                                      dilation=conv.dilation)[0]
        result = (result + bias[:, None, None]).to(like.dtype).unsqueeze(0)
        if channels_last:
            result = result.contiguous(memory_format=torch.channels_last)
        if not compiling:
            self._last = (key, result)
        return result

    def extra_repr(self) -> str:
        return f"out={self.kernel.shape[0]}" + (", per position" if self.kernel.numel() else ", per channel")


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def selection_of(bn: nn.Module) -> ChannelSelection | None:
    """The ChannelSelection inserted into `bn` (its child `select`), if any."""
    child = getattr(bn, SELECT, None)
    return child if isinstance(child, ChannelSelection) else None


def _select_hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, SELECT)(output)


def insert_selections(model: nn.Module, bn_names: tuple[str, ...] | list[str]) -> None:
    """Give each named BN a child `select` (ChannelSelection) applied to its output by a forward hook
    (in place; a BN that already has one is left alone)."""
    for name in bn_names:
        bn = model.get_submodule(name)
        if selection_of(bn) is not None:
            continue
        bn.add_module(SELECT, ChannelSelection(bn.num_features).to(bn.weight.device))
        bn.register_forward_hook(_select_hook)


def _response_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    # `.forward` directly: no module-call machinery per layer at batch 1 (ConstantResponse has no hooks).
    return module._modules[COMPENSATE].forward(output, module, inputs[0].shape[-2:])


def response_of(layer: nn.Module) -> ConstantResponse | None:
    """The ConstantResponse attached to a conv or Linear (its child `compensate`), if any."""
    child = getattr(layer, COMPENSATE, None)
    return child if isinstance(child, ConstantResponse) else None


def attach_response(layer: nn.Module, *, bias: torch.Tensor | None = None, kernel: torch.Tensor | None = None) -> None:
    """Add a per-channel `bias` [out] and/or a per-position `kernel` [out, kh, kw] to the layer's
    ConstantResponse, attaching one (and its forward hook) if it has none."""
    out = layer.weight.shape[0]
    existing = response_of(layer)
    kh, kw = kernel.shape[-2:] if kernel is not None else (existing.shape[1:] if existing is not None else (0, 0))
    if existing is None or (kernel is not None and existing.shape != [out, kh, kw]):
        new = _attached(layer, ConstantResponse(out, kh, kw))
        if existing is not None:  # it had only a per-channel term: keep it
            new.bias.copy_(existing.bias)
        existing = new
    if bias is not None:
        existing.bias.add_(bias.to(existing.bias))
    if kernel is not None:
        existing.kernel.add_(kernel.to(existing.kernel))


def detach_response(layer: nn.Module) -> None:
    """Remove the layer's ConstantResponse and its hook (once its term lives in the layer's own bias)."""
    delattr(layer, COMPENSATE)
    for key, hook in list(layer._forward_hooks.items()):
        if hook is _response_hook:
            del layer._forward_hooks[key]
            layer._forward_hooks_always_called.pop(key, None)


def _attached(layer: nn.Module, response: ConstantResponse) -> ConstantResponse:
    """`response` as the layer's child `compensate` (on its device, in its dtype), hooked once."""
    response = response.to(layer.weight)
    layer.add_module(COMPENSATE, response)
    if _response_hook not in layer._forward_hooks.values():
        layer.register_forward_hook(_response_hook)
    return response


def has_foreign_hooks(module: nn.Module) -> bool:
    """Whether `module` has forward or forward-pre hooks other than the ones slimctl inserts (a
    selection's, a constant response's): code that may read or change its output unseen."""
    ours = (_select_hook, _response_hook)
    return bool(module._forward_pre_hooks) or any(h not in ours for h in module._forward_hooks.values())


def is_inserted(model: nn.Module, name: str) -> bool:
    """Whether `name` denotes a module slimctl inserts (`<bn>.select`, `<conv or linear>.compensate`),
    judged by its parent's type (a family's own `select` modules sit beside their BN, not in it)."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        return False
    return (child == SELECT and _is_bn(parent)) or (child == COMPENSATE and isinstance(parent, (nn.Conv2d, nn.Linear)))


def insert_recorded(model: nn.Module, widths: dict[str, list[int]]) -> None:
    """Recreate the selections (`<bn>.select`) and constant responses (`<layer>.compensate`) a
    checkpoint's widths record but `model` lacks (call after resizing their parents)."""
    for name, shape in widths.items():
        if not is_inserted(model, name):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if child == SELECT:
            insert_selections(model, [parent_name])
        elif response_of(parent) is None:
            _attached(parent, ConstantResponse(*shape))


def reattach_selections(model: nn.Module) -> nn.Module:
    """Re-hook inserted selections after a module swap that keeps a BN's children but not its hooks
    (`nn.SyncBatchNorm.convert_sync_batchnorm`): without it the consumers would get the full width."""
    for m in model.modules():
        if _is_bn(m) and selection_of(m) is not None and _select_hook not in m._forward_hooks.values():
            m.register_forward_hook(_select_hook)
    return model
