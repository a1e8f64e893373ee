"""Model registry: a dict of builders plus a decorator (the torchvision/timm pattern).

`create_model(arch, num_classes, width=1.0, widths=None, **arch_args)` builds a family member at full width;
`widths` (module name → shape, as recorded by `module_widths`) then narrows it to a pruned shape,
so a checkpoint rebuilds its model from (arch, num_classes, arch_args, widths) alone.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

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
    **arch_args: Any,
) -> nn.Module:
    """Build `arch` for `num_classes`; `width` scales every layer; `widths` narrows it to a pruned shape.

    Further keywords (`arch_args`, e.g. `depth=56` for `preresnet`) go to the family's builder and
    are recorded in `model.arch_spec`, so a checkpoint rebuilds the same network.
    """
    if arch not in _REGISTRY:
        raise SlimctlError(f"unknown arch {arch!r}; known: {', '.join(list_models())}")
    builder = _REGISTRY[arch]
    accepted = inspect.signature(builder).parameters
    unknown = sorted(set(arch_args) - set(accepted))
    if unknown:
        options = sorted(set(accepted) - {"num_classes", "width"})
        raise SlimctlError(
            f"arch {arch!r} takes no argument {', '.join(map(repr, unknown))}"
            f" (it takes: {', '.join(options) if options else 'only width'})"
        )
    model = builder(num_classes=num_classes, width=width, **arch_args)
    if widths is not None:
        apply_widths(model, widths)
    # What a checkpoint records to rebuild this model (see slimctl.checkpoint).
    model.arch_spec = {"arch": arch, "num_classes": num_classes, "arch_args": {"width": width, **arch_args}}
    return model


# Importing the families registers them.
from slimctl.models import densenet, preresnet, vgg  # noqa: E402,F401

__all__ = [
    "ChannelSelection",
    "create_model",
    "list_models",
    "module_widths",
    "register_model",
]
