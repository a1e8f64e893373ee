"""Model registry: a dict of builders plus a decorator (the torchvision/timm pattern).

`create_model(arch, num_classes, width=1.0, widths=None)` builds a family member at full width;
`widths` (module name → shape, as recorded by `module_widths`) then narrows it to a pruned shape,
so a checkpoint rebuilds its model from (arch, num_classes, arch_args, widths) alone.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from slimctl.errors import SlimctlError
from slimctl.models.layers import ChannelSelection, apply_widths, module_widths

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(
    arch: str,
    num_classes: int,
    *,
    width: float = 1.0,
    widths: dict[str, list[int]] | None = None,
) -> nn.Module:
    """Build `arch` for `num_classes`; `width` scales every layer; `widths` narrows it to a pruned shape."""
    if arch not in _REGISTRY:
        raise SlimctlError(f"unknown arch {arch!r}; known: {', '.join(list_models())}")
    model = _REGISTRY[arch](num_classes=num_classes, width=width)
    if widths is not None:
        apply_widths(model, widths)
    # What a checkpoint records to rebuild this model (see slimctl.checkpoint).
    model.arch_spec = {"arch": arch, "num_classes": num_classes, "arch_args": {"width": width}}
    return model


# Importing the families registers them.
from slimctl.models import vgg  # noqa: E402,F401

__all__ = [
    "ChannelSelection",
    "create_model",
    "list_models",
    "module_widths",
    "register_model",
]
