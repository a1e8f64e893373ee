"""The model registry: a dict of builders plus a decorator (the torchvision/timm pattern), the
`torchvision.<name>` and `timm.<name>` namespaces, a user's own model named by import path
(`mypkg.models:MyNet`), and the one rule for a model's input size.

Families register themselves here (`@register_model("vgg19")`); `slimctl.models.create_model`
builds from it. Nothing here imports a family, so any layer may ask what an arch is.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from types import ModuleType
from typing import Any, Callable

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


# `package.module:Name` (Name may be dotted: `Outer.Inner`): a user's nn.Module subclass or builder.
IMPORT_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_BUILDERS: set[Callable[..., nn.Module]] = set()


def register_builder(function: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: a function of the user's that builds an nn.Module may be named as an arch
    (`mypkg.models:build_net`). Only decorated functions are ever called by name: a checkpoint or
    config naming any other function (`os:system`) is refused before anything is called."""
    _BUILDERS.add(function)
    return function


def is_import_path(arch: str) -> bool:
    return ":" in arch


def resolve_import(arch: str) -> Callable[..., nn.Module]:
    """The nn.Module subclass or registered builder `arch` names ("module:Name"), imported from the
    working directory or PYTHONPATH as `python -m` would. Anything else is a one-line SlimctlError:
    a malformed name, a standard-library module, a module that does not import, a name that is not
    there or is neither kind. Importing runs the module's code, as importing torchvision does: name
    only modules you trust."""
    if not IMPORT_PATH.fullmatch(arch):
        raise SlimctlError(f"model.arch {arch[:100]!r}: expected package.module:ClassName (e.g. mypkg.models:MyNet)")
    module_name, _, attr = arch.partition(":")
    if module_name.split(".")[0] in sys.stdlib_module_names:
        raise SlimctlError(f"model.arch {arch!r}: {module_name} is Python's standard library, not a model module")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # the `slimctl` script, unlike `python -m`, does not add it
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise SlimctlError(f"model.arch {arch!r}: cannot import {module_name} ({exc}); run slimctl from the folder "
                           "that holds it or add that folder to PYTHONPATH") from None
    except Exception as exc:  # the user's module raised while importing
        raise SlimctlError(f"model.arch {arch!r}: importing {module_name} failed ({type(exc).__name__}: "
                           f"{str(exc)[:200]})") from None
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise SlimctlError(f"model.arch {arch!r}: {module_name} has no {attr}")
    if (isinstance(target, type) and issubclass(target, nn.Module)) or target in _BUILDERS:
        return target
    raise SlimctlError(f"model.arch {arch!r} is neither an nn.Module subclass nor a function decorated with "
                       "@slimctl.register_builder; slimctl builds nothing else")


def plain_data(value: Any, where: str) -> Any:
    """`value` if it is plain data (None, bool, int, float, str, and lists and str-keyed dicts of
    them), else a SlimctlError: a model's recorded arguments never carry objects."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain_data(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: plain_data(v, where) for k, v in value.items()}
    raise SlimctlError(f"{where}: {type(value).__name__} is not plain data (numbers, strings, lists, dicts)")


def is_known_arch(arch: str) -> bool:
    if is_import_path(arch):
        resolve_import(arch)  # a SlimctlError says why not
        return True
    if arch.startswith(TORCHVISION):
        return arch[len(TORCHVISION):] in torchvision_models()
    if arch.startswith(TIMM):
        return bool(import_timm(f"model.arch {arch!r}").is_model(arch[len(TIMM):]))
    return arch in _REGISTRY


def default_input_size(arch: str | None) -> tuple[int, int, int]:
    """The size an arch is built for when nothing says otherwise: 32×32 for slimctl's CIFAR
    families, 224×224 for torchvision, timm and imported models and for a model slimctl did not
    build (arch None)."""
    if arch is None or arch.startswith((TORCHVISION, TIMM)) or is_import_path(arch):
        return IMAGENET_INPUT
    return CIFAR_INPUT


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) a model is traced with, counted at and benchmarked at: the size it records
    (`arch_spec["input_size"]`, set by create_model from the data), else `default_input_size`."""
    spec = getattr(model, "arch_spec", None) or {}
    if "input_size" in spec:
        return tuple(spec["input_size"])
    return default_input_size(spec.get("arch"))
