"""Which device and which precision a run uses, and the autocast context for it."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from slimctl.errors import SlimctlError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# torch.compile's modes; `reduce-overhead` and `max-autotune` capture CUDA graphs on a GPU, which
# is what removes the per-kernel launch cost that bounds small-batch training (batch 64 on CIFAR).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SlimctlError("device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SlimctlError(f"unknown device {name!r}; use one of {', '.join(DEVICES)} (or cuda:N)") from None


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run natively (private torch probes, absent on old builds)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. `auto` is bf16 only where it is native."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_native_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def compile_mode(setting: bool | str) -> str | None:
    """`train.compile` → a torch.compile mode, or None (eager): true means torch's default mode."""
    if setting is False:
        return None
    if setting is True:
        return "default"
    if setting not in COMPILE_MODES:
        raise SlimctlError(f"unknown compile mode {setting!r}; use true, false or one of {', '.join(COMPILE_MODES)}")
    return setting
