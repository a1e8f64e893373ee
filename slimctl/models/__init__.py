"""Build models: slimctl's own families (registered in `slimctl.base.registry`), torchvision's and timm's.

`create_model(arch, num_classes, width=1.0, widths=None, **arch_args)` builds a family member, a
torchvision or timm model, or a user's own (`mypkg.models:MyNet`, arch_args its constructor's) at full width;
`widths` (module name → shape, as recorded by `module_widths`) then narrows it to a pruned shape,
so a checkpoint rebuilds its model from (arch, num_classes, arch_args, widths) alone.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable

import torch
from torch import nn

# Importing the families registers them.
from slimctl.models import densenet, preresnet, vgg  # noqa: F401
from slimctl.errors import SlimctlError, format_bytes, is_out_of_memory, out_of_memory, out_of_memory_as_error
from slimctl.base.inserted import ChannelSelection, insert_recorded, is_inserted
from slimctl.models.layers import apply_widths, module_widths
from slimctl.base.registry import (
    TIMM,
    TORCHVISION,
    builder,
    default_input_size,
    import_timm,
    is_import_path,
    is_known_arch,
    list_models,
    plain_data,
    register_model,
    resolve_import,
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
    unless given). A model too large for this machine is a SlimctlError ("out of memory while
    building …"), refused before allocating when its parameters alone exceed the physical memory.
    """
    if not (isinstance(width, (int, float)) and width > 0):  # nan too; inf is "out of memory" below
        raise SlimctlError(f"width must be a positive number, got {str(width)[:40]}")
    if arch.startswith(TORCHVISION):
        build = _torchvision_builder(arch[len(TORCHVISION):], num_classes, width, arch_args)
        what, advice = f"building {arch}", "the model size: pick a smaller torchvision model"
    elif arch.startswith(TIMM):
        build = _timm_builder(arch[len(TIMM):], num_classes, width, arch_args)
        what, advice = f"building {arch}", "the model size: pick a smaller timm model"
    elif is_import_path(arch):
        build = _imported_builder(arch, num_classes, width, arch_args)
        what, advice = f"building {arch}", "the model's arguments (model.args)"
    else:
        build = _family_builder(arch, num_classes, width, arch_args)
        what, advice = f"building {arch} at width {width:g}", "model.width / --width"
        if num_classes is not None and num_classes > 100_000:  # the head alone may be what does not fit
            what, advice = f"{what} for {num_classes:,} classes", f"{advice}, or the number of classes"
        # At width <= 1 with the default depth every family has at most vgg19's 20M parameters
        # (80 MB): the count (10-150 ms on "meta") is only worth it above that.
        if width > 1 or arch_args:
            what = check_fits_in_memory(build, what, advice)
    with out_of_memory_as_error(what, advice):
        model = build()
        if widths is not None:
            # Layers first, then what slimctl inserted into them (resizing a layer makes a fresh module).
            inserted = {n: s for n, s in widths.items() if is_inserted(model, n)}
            apply_widths(model, {n: s for n, s in widths.items() if n not in inserted})
            insert_recorded(model, inserted)
            apply_widths(model, inserted)
    # What a checkpoint records to rebuild this model (see slimctl.io.checkpoint).
    model.arch_spec = {
        "arch": arch,
        "num_classes": num_classes,
        "arch_args": {"width": width, **arch_args},
        "input_size": list(input_size or default_input_size(arch)),
    }
    return model


def physical_memory() -> int | None:
    """Bytes of RAM in this machine (None where the OS does not say, e.g. Windows)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits_in_memory(build: Callable[[], nn.Module], what: str, advice: str) -> str:
    """`what` with the model's parameter count, counted on the meta device (nothing allocated);
    raises the out-of-memory SlimctlError when its parameters and buffers exceed the physical memory.

    Linux hands out memory lazily: a model larger than RAM can be allocated without error, and the
    kernel then kills the process (no message) as initialisation touches it. slimctl's families
    build on "meta" without drawing random numbers, so the real build that follows is unchanged
    (tests/pipeline/test_oom.py checks both for every family). Not for torchvision models: some (RegNet)
    compute widths from tensor values at construction, which the meta device cannot.
    """
    try:
        with torch.device("meta"):
            model = build()
    except (RuntimeError, TypeError, OverflowError) as exc:
        if not (isinstance(exc, OverflowError) or "overflow" in str(exc).lower()):
            raise
        # A tensor's byte count past int64 (or an infinite width): no machine has that much.
        detail = "one weight tensor alone would need more than 8 EiB (its size overflows 64 bits)"
        raise out_of_memory(what, detail, advice) from None
    what = f"{what} (≈ {sum(p.numel() for p in model.parameters()):.3g} parameters)"
    needed = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])  # bytes
    memory = physical_memory()
    if memory is not None and needed > memory:
        detail = f"its parameters alone need {format_bytes(needed)} but this machine has {format_bytes(memory)}"
        raise out_of_memory(what, detail, advice)
    return what


def _family_builder(arch: str, num_classes: int, width: float, arch_args: dict[str, Any]) -> Callable[[], nn.Module]:
    """The family's builder with these arguments, checked: unknown arch or arguments are a SlimctlError."""
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
    return functools.partial(build, num_classes=num_classes, width=width, **arch_args)


def _torchvision_builder(
    name: str, num_classes: int, width: float, arch_args: dict[str, Any]
) -> Callable[[], nn.Module]:
    """A randomly initialised torchvision model (pretrained weights: `model.weights`, loaded later)."""
    import torchvision  # heavy: only for torchvision archs

    if name not in torchvision_models():
        raise SlimctlError(f"unknown torchvision model {name!r}; e.g. resnet50, mobilenet_v2 (torchvision.models.list_models())")
    if width != 1.0:
        raise SlimctlError("model.width scales slimctl's own families only; torchvision models keep their widths")
    # GoogLeNet and Inception-v3 warn (FutureWarning) unless init_weights is given; True is what
    # torchvision uses when it is not, so the models are the same, without the warning.
    quiet = {"init_weights": True} if name in ("googlenet", "inception_v3") else {}

    def build() -> nn.Module:
        try:
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **{**quiet, **arch_args})
        except (TypeError, ValueError) as exc:
            raise SlimctlError(f"torchvision.{name}: {exc}") from None

    return build


def _timm_builder(name: str, num_classes: int, width: float, arch_args: dict[str, Any]) -> Callable[[], nn.Module]:
    """A randomly initialised timm model, `timm.create_model(name, num_classes=…, **arch_args)`
    (pretrained weights: `model.weights: timm` or a file, loaded later)."""
    timm = import_timm(f"model.arch 'timm.{name}'")
    if not timm.is_model(name):
        raise SlimctlError(f"unknown timm model {name!r}; e.g. resnet18, efficientnet_b0 (timm.list_models())")
    if width != 1.0:
        raise SlimctlError("model.width scales slimctl's own families only; timm models keep their widths")

    def build() -> nn.Module:
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, **arch_args)
        except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
            raise SlimctlError(f"timm.{name}: {exc}") from None

    return build


def _imported_builder(arch: str, num_classes: int | None, width: float,
                      arch_args: dict[str, Any]) -> Callable[[], nn.Module]:
    """A user's model (`module:Name`, see `registry.resolve_import`) called with its plain-data
    keyword arguments (`args`: kept apart from create_model's own, which may share their names),
    and `num_classes` when its signature names that parameter."""
    target = resolve_import(arch)
    if width != 1.0:
        raise SlimctlError("model.width scales slimctl's own families only; give your model's own width in model.args")
    unknown = sorted(set(arch_args) - {"args"})
    if unknown:
        raise SlimctlError(f"{arch}: pass the constructor's arguments as args={{...}} (model.args), not as "
                           f"{', '.join(unknown)}")
    kwargs = plain_data(arch_args.get("args") or {}, f"the arguments of {arch}")
    try:
        takes = inspect.signature(target).parameters
    except (TypeError, ValueError):  # no signature to read (e.g. a C extension): pass only the arguments
        takes = {}
    if "num_classes" in takes and "num_classes" not in kwargs and num_classes is not None:
        kwargs["num_classes"] = num_classes

    def build() -> nn.Module:
        try:
            model = target(**kwargs)
        except Exception as exc:  # the user's constructor: any failure is one line, out of memory aside
            if is_out_of_memory(exc):
                raise
            raise SlimctlError(f"{arch}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())[:200]}) failed "
                               f"({type(exc).__name__}: {str(exc)[:200]})") from None
        if not isinstance(model, nn.Module):
            raise SlimctlError(f"{arch} returned a {type(model).__name__}, not an nn.Module")
        return model

    return build


__all__ = [
    "ChannelSelection",
    "create_model",
    "is_known_arch",
    "list_models",
    "module_widths",
    "register_model",
]
