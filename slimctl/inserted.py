"""Modules slimctl adds inside a network, each with one name, one way to insert it and one way to
find it again.

`ChannelSelection` passes on only the kept channels of a BN that must keep its width (the paper's
"channel selection"). The paper's pre-activation families hold one as an ordinary module; in any
other model (a traced torchvision model) slimctl adds it as the child `select` of the BN itself and
applies it with a forward hook, so the BN keeps its name and its state_dict keys (the selection adds
`<bn>.select.indices`). A checkpoint records `<bn>.select` among its widths, and `insert_recorded`
recreates the child before the weights are loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SELECT = "select"  # the child name of an inserted ChannelSelection: `<bn>.select`


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


def insert_recorded(model: nn.Module, widths: dict[str, list[int]]) -> None:
    """Recreate the selections a checkpoint's widths record (`<bn>.select`) but `model` lacks."""
    modules = dict(model.named_modules())
    suffix = f".{SELECT}"
    names = [n[: -len(suffix)] for n in widths if n.endswith(suffix) and n not in modules]
    insert_selections(model, [n for n in names if _is_bn(modules.get(n, nn.Identity()))])


def reattach_selections(model: nn.Module) -> nn.Module:
    """Re-hook inserted selections after a module swap that keeps a BN's children but not its hooks
    (`nn.SyncBatchNorm.convert_sync_batchnorm`): without it the consumers would get the full width."""
    for m in model.modules():
        if _is_bn(m) and selection_of(m) is not None and _select_hook not in m._forward_hooks.values():
            m.register_forward_hook(_select_hook)
    return model
