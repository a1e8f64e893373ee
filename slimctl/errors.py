"""The one exception type users see as a message instead of a traceback, and out of memory as one.

A leaf: it imports nothing from slimctl and no torch (torch's out-of-memory errors are recognised
by class name), so any module may use it.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator


class SlimctlError(Exception):
    """Bad input from the user: a config, a checkpoint, a data folder, a flag.

    The CLI prints the message on stderr and exits with code 2. The message says what was
    wrong and how to fix it, in one or two lines.
    """


# torch.OutOfMemoryError (torch.cuda.OutOfMemoryError is the same class) and its subclasses.
OOM_CLASS_NAMES = {"OutOfMemoryError"}
# What allocators say when they fail with a plain RuntimeError: CPU ("DefaultCPUAllocator: can't
# allocate memory"), CUDA/MPS/XPU ("… out of memory").
OOM_MESSAGES = ("can't allocate memory", "out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` says the device or the host ran out of memory (Python's MemoryError included)."""
    if isinstance(exc, MemoryError) or any(cls.__name__ in OOM_CLASS_NAMES for cls in type(exc).__mro__):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OOM_MESSAGES)


def format_bytes(n: float) -> str:
    """Binary units with two decimals, as torch's allocators print them: 2.00 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024:
            return f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} EiB"


def out_of_memory(what: str, detail: str, advice: str) -> SlimctlError:
    """The one-line message for running out of memory: what was being done, how much, what to lower."""
    return SlimctlError(f"out of memory while {what}: {detail}; lower {advice}")


def allocation_detail(exc: BaseException) -> str:
    """The short part of an allocator's message: how much it tried to allocate, and the GPU's state."""
    text = str(exc)
    cpu = re.search(r"tried to allocate (\d+) bytes", text)  # DefaultCPUAllocator: a byte count
    if cpu:
        return f"tried to allocate {format_bytes(int(cpu.group(1)))}"
    cuda = re.search(r"Tried to allocate ([\d.]+ \w+)", text)  # CUDA caching allocator: "2.00 GiB"
    if cuda:
        gpu = re.search(r"(GPU \d+) has a total capacity of ([\d.]+ \w+) of which ([\d.]+ \w+) is free", text)
        free = f" ({gpu.group(1)}: {gpu.group(3)} free of {gpu.group(2)})" if gpu else ""
        return f"tried to allocate {cuda.group(1)}{free}"
    first_line = (text.strip().splitlines() or [""])[0][:200]
    return first_line or type(exc).__name__


@contextmanager
def out_of_memory_as_error(what: str, advice: str) -> Iterator[None]:
    """Out of memory inside the block becomes `out_of_memory(what, …, advice)`; anything else passes.

    `what` is the work ("training vgg19 (batch size 64)"), `advice` the settings to lower
    ("data.batch_size or model.width"). The traceback is dropped (`from None`): the message is the
    whole story, and the allocator's tensors are freed with it.
    """
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - only out of memory is converted; the rest re-raised as is
        if not is_out_of_memory(exc):
            raise
        raise out_of_memory(what, allocation_detail(exc), advice) from None
