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


TORCHVISION = "torchvision."  # `torchvision.resnet50`: any torchvision classification model
CIFAR_INPUT = (3, 32, 32)
IMAGENET_INPUT = (3, 224, 224)


def list_models() -> list[str]:
    """slimctl's own families; any `torchvision.<name>` classification model is accepted too."""
    return sorted(_REGISTRY)


def torchvision_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def is_known_arch(arch: str) -> bool:
    if arch.startswith(TORCHVISION):
        return arch[len(TORCHVISION):] in torchvision_models()
    return arch in _REGISTRY


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
    (C, H, W) is what FLOPs are counted at and graphs are traced with (32×32 for the CIFAR
    families, 224×224 for torchvision models unless given).
    """
    if arch.startswith(TORCHVISION):
        model = _torchvision_model(arch[len(TORCHVISION):], num_classes, width, arch_args)
        default_input = IMAGENET_INPUT
    else:
        model = _family_model(arch, num_classes, width, arch_args)
        default_input = CIFAR_INPUT
    if widths is not None:
        _insert_recorded_selections(model, widths)
        apply_widths(model, widths)
    # What a checkpoint records to rebuild this model (see slimctl.checkpoint).
    model.arch_spec = {
        "arch": arch,
        "num_classes": num_classes,
        "arch_args": {"width": width, **arch_args},
        "input_size": list(input_size or default_input),
    }
    return model


def _family_model(arch: str, num_classes: int, width: float, arch_args: dict[str, Any]) -> nn.Module:
    if arch not in _REGISTRY:
        raise SlimctlError(f"unknown arch {arch!r}; known: {', '.join(list_models())}, or torchvision.<name>")
    builder = _REGISTRY[arch]
    accepted = inspect.signature(builder).parameters
    unknown = sorted(set(arch_args) - set(accepted))
    if unknown:
        options = sorted(set(accepted) - {"num_classes", "width"})
        raise SlimctlError(
            f"arch {arch!r} takes no argument {', '.join(map(repr, unknown))}"
            f" (it takes: {', '.join(options) if options else 'only width'})"
        )
    return builder(num_classes=num_classes, width=width, **arch_args)


def _torchvision_model(name: str, num_classes: int, width: float, arch_args: dict[str, Any]) -> nn.Module:
    """A randomly initialised torchvision model (pretrained weights: `model.weights`, loaded later)."""
    import torchvision

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


def _insert_recorded_selections(model: nn.Module, widths: dict[str, list[int]]) -> None:
    """Traced models carry ChannelSelection children on some BNs (`<bn>.select`): recreate them."""
    from slimctl.trace import insert_selections

    modules = dict(model.named_modules())
    names = [n[: -len(".select")] for n in widths if n.endswith(".select") and n not in modules]
    insert_selections(model, [n for n in names if isinstance(modules.get(n), nn.BatchNorm2d)])


# Importing the families registers them.
from slimctl.models import densenet, preresnet, vgg  # noqa: E402,F401

__all__ = [
    "ChannelSelection",
    "create_model",
    "list_models",
    "module_widths",
    "register_model",
]
