"""Build models: slimctl's own families (registered in `slimctl.registry`) and torchvision's.

`create_model(arch, num_classes, width=1.0, widths=None, **arch_args)` builds a family member at full width;
`widths` (module name → shape, as recorded by `module_widths`) then narrows it to a pruned shape,
so a checkpoint rebuilds its model from (arch, num_classes, arch_args, widths) alone.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

# Importing the families registers them.
from slimctl.models import densenet, preresnet, vgg  # noqa: F401
from slimctl.errors import SlimctlError
from slimctl.inserted import ChannelSelection, insert_recorded, is_inserted
from slimctl.models.layers import apply_widths, module_widths
from slimctl.registry import (
    TORCHVISION,
    builder,
    default_input_size,
    is_known_arch,
    list_models,
    register_model,
    torchvision_models,
)


def create_model(
    arch: str,
    num_classes: int,
    *,
    width: float = 1.0,
    widths: dict[str, list[int]] | None = None,
    input_size: tuple[int, int, int] | list[int] | None = None,
    **arch_args: Any,
) -> nn.Module:
    """Build `arch` for `num_classes`; `width` scales every layer; `widths` narrows it to a pruned shape.

    Further keywords (`arch_args`, e.g. `depth=56` for `preresnet`) go to the family's builder and
    are recorded in `model.arch_spec`, so a checkpoint rebuilds the same network. `input_size`
    (C, H, W) is what FLOPs are counted at and graphs are traced with (`registry.default_input_size`
    unless given).
    """
    if arch.startswith(TORCHVISION):
        model = _torchvision_model(arch[len(TORCHVISION):], num_classes, width, arch_args)
    else:
        model = _family_model(arch, num_classes, width, arch_args)
    if widths is not None:
        # Layers first, then what slimctl inserted into them (resizing a layer makes a fresh module).
        inserted = {n: s for n, s in widths.items() if is_inserted(model, n)}
        apply_widths(model, {n: s for n, s in widths.items() if n not in inserted})
        insert_recorded(model, inserted)
        apply_widths(model, inserted)
    # What a checkpoint records to rebuild this model (see slimctl.checkpoint).
    model.arch_spec = {
        "arch": arch,
        "num_classes": num_classes,
        "arch_args": {"width": width, **arch_args},
        "input_size": list(input_size or default_input_size(arch)),
    }
    return model


def _family_model(arch: str, num_classes: int, width: float, arch_args: dict[str, Any]) -> nn.Module:
    build = builder(arch)
    if build is None:
        raise SlimctlError(f"unknown arch {arch!r}; known: {', '.join(list_models())}, or torchvision.<name>")
    accepted = inspect.signature(build).parameters
    unknown = sorted(set(arch_args) - set(accepted))
    if unknown:
        options = sorted(set(accepted) - {"num_classes", "width"})
        raise SlimctlError(
            f"arch {arch!r} takes no argument {', '.join(map(repr, unknown))}"
            f" (it takes: {', '.join(options) if options else 'only width'})"
        )
    return build(num_classes=num_classes, width=width, **arch_args)


def _torchvision_model(name: str, num_classes: int, width: float, arch_args: dict[str, Any]) -> nn.Module:
    """A randomly initialised torchvision model (pretrained weights: `model.weights`, loaded later)."""
    import torchvision  # heavy: only for torchvision archs

    if name not in torchvision_models():
        raise SlimctlError(f"unknown torchvision model {name!r}; e.g. resnet50, mobilenet_v2 (torchvision.models.list_models())")
    if width != 1.0:
        raise SlimctlError("model.width scales slimctl's own families only; torchvision models keep their widths")
    # GoogLeNet and Inception-v3 warn (FutureWarning) unless init_weights is given; True is what
    # torchvision uses when it is not, so the models are the same, without the warning.
    quiet = {"init_weights": True} if name in ("googlenet", "inception_v3") else {}
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **{**quiet, **arch_args})
    except (TypeError, ValueError) as exc:
        raise SlimctlError(f"torchvision.{name}: {exc}") from None


__all__ = [
    "ChannelSelection",
    "create_model",
    "is_known_arch",
    "list_models",
    "module_widths",
    "register_model",
]
