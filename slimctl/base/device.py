"""Which device and which precision a run uses, and the autocast context for it."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from slimctl.errors import SlimctlError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # autocast dtype → name
# torch.compile's modes; `reduce-overhead` and `max-autotune` capture CUDA graphs on a GPU, which
# is what removes the per-kernel launch cost that bounds small-batch training (batch 64 on CIFAR).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def resolve_device(name: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N`, checked against this machine: anything else (`meta`, `mps`,
    a GPU index that is not there) is a one-line SlimctlError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise SlimctlError(f"unknown device {str(name)[:40]!r}; use one of {', '.join(DEVICES)} (or cuda:N)")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SlimctlError(f"device is {name!r} but no CUDA device is available; use 'auto' or 'cpu'")
        if device.index is not None and device.index >= count:
            raise SlimctlError(f"device is {name!r} but this machine has {count} CUDA device(s): cuda:0 to "
                               f"cuda:{count - 1}")
    return device


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


def cpu_description() -> tuple[str, list[str]]:
    """(CPU model name, the flags that decide training speed here) from /proc/cpuinfo; ("unknown", [])
    where the OS has no such file."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown", []
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 "unknown")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return model, [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]


def environment(device: torch.device, dtype: torch.dtype | None) -> dict[str, object]:
    """What a run's figures were measured on: recorded in its config.yaml and checkpoints, shown by
    `report`, so throughput or accuracy from different machines cannot be mixed up unnoticed."""
    cpu, flags = cpu_description()
    return {
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": cpu,
        "cpu_flags": flags,
        "threads": torch.get_num_threads(),
        "precision": PRECISION_NAMES.get(dtype, str(dtype)),
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda,
    }


def machine_label(env: dict[str, object] | None) -> str:
    """One short line for tables: 'NVIDIA H200, bf16' or 'Intel Xeon (avx512_bf16), 2 threads, fp32'."""
    if not env:
        return "-"
    if env.get("gpu"):
        return f"{env['gpu']}, {env.get('precision')}"
    flags = [f for f in env.get("cpu_flags") or [] if f in ("avx512_bf16", "amx_tile")] or \
        [f for f in env.get("cpu_flags") or [] if f == "avx2"]
    return f"{env.get('cpu')}{f' ({flags[0]})' if flags else ''}, {env.get('threads')} threads, {env.get('precision')}"
