"""Inference latency of checkpoints: does the pruned model actually run faster?

Median wall time of a forward pass (inference mode, eval, channels_last, autocast where it is the
fast path) after warm-up, per batch size; the speed-up is against the first checkpoint.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimctl.checkpoint import load_checkpoint, model_from_checkpoint
from slimctl.flops import count_flops, count_params
from slimctl.device import autocast


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def latency_ms(
    model: nn.Module,
    *,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
    repeats: int = 20,
    warmup: int = 3,
    channels_last: bool = True,
    input_size: tuple[int, int, int] = (3, 32, 32),
) -> float:
    """Median milliseconds per forward pass of a `batch_size` batch."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).eval()
    x = torch.randn(batch_size, *input_size, device=device).contiguous(memory_format=fmt)
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        with autocast(device, dtype):
            model(x)
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_checkpoints(
    paths: list[Path],
    *,
    batch_sizes: list[int],
    device: torch.device,
    dtype: torch.dtype | None,
    repeats: int = 20,
    warmup: int = 3,
) -> list[dict[str, Any]]:
    """One row per (checkpoint, batch size): params, FLOPs, latency, images/s, speed-up vs the first."""
    models = [(p, model_from_checkpoint(load_checkpoint(p), source=str(p))) for p in paths]
    rows = []
    baseline: dict[int, float] = {}
    for path, model in models:
        params, flops = count_params(model), count_flops(model)
        for bs in batch_sizes:
            ms = latency_ms(model, batch_size=bs, device=device, dtype=dtype, repeats=repeats, warmup=warmup,
                            input_size=tuple(model.arch_spec["input_size"]))
            baseline.setdefault(bs, ms)
            rows.append({
                "checkpoint": str(path), "params": params, "flops": flops, "batch_size": bs,
                "latency_ms": ms, "images_per_sec": bs / ms * 1e3, "speedup": baseline[bs] / ms,
            })
    return rows
