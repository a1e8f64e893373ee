"""The model registry: a dict of builders plus a decorator (the torchvision/timm pattern), the
`torchvision.<name>` and `timm.<name>` namespaces, and the one rule for a model's input size.

Families register themselves here (`@register_model("vgg19")`); `slimctl.models.create_model`
builds from it. Nothing here imports a family, so any layer may ask what an arch is.
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable

from torch import nn

from slimctl.errors import SlimctlError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

TORCHVISION = "torchvision."  # `torchvision.resnet50`: any torchvision classification model
TIMM = "timm."  # `timm.efficientnet_b0`: any timm model (optional extra: pip install 'slimctl[timm]')
CIFAR_INPUT = (3, 32, 32)  # C, H, W
IMAGENET_INPUT = (3, 224, 224)


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorator


def builder(name: str) -> Callable[..., nn.Module] | None:
    return _REGISTRY.get(name)


def list_models() -> list[str]:
    """slimctl's own families (registered when `slimctl.models` is imported); any
    `torchvision.<name>` classification model and any `timm.<name>` model are accepted too."""
    return sorted(_REGISTRY)


def import_timm(what: str = "a timm.<name> arch") -> ModuleType:
    """The timm package, or a SlimctlError naming the extra that installs it."""
    try:
        import timm  # optional, heavy: only when a timm arch is named
    except ImportError:
        raise SlimctlError(f"{what} needs timm, an optional extra: pip install 'slimctl[timm]'") from None
    return timm


def torchvision_models() -> list[str]:
    import torchvision  # heavy: only when a torchvision arch is named

    return sorted(torchvision.models.list_models(module=torchvision.models))


def is_known_arch(arch: str) -> bool:
    if arch.startswith(TORCHVISION):
        return arch[len(TORCHVISION):] in torchvision_models()
    if arch.startswith(TIMM):
        return bool(import_timm(f"model.arch {arch!r}").is_model(arch[len(TIMM):]))
    return arch in _REGISTRY


def default_input_size(arch: str | None) -> tuple[int, int, int]:
    """The size an arch is built for when nothing says otherwise: 32×32 for slimctl's CIFAR
    families, 224×224 for torchvision and timm models and for a model slimctl did not build (arch None)."""
    if arch is None or arch.startswith((TORCHVISION, TIMM)):
        return IMAGENET_INPUT
    return CIFAR_INPUT


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) a model is traced with, counted at and benchmarked at: the size it records
    (`arch_spec["input_size"]`, set by create_model from the data), else `default_input_size`."""
    spec = getattr(model, "arch_spec", None) or {}
    if "input_size" in spec:
        return tuple(spec["input_size"])
    return default_input_size(spec.get("arch"))
