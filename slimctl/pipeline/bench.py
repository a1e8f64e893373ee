"""Inference latency of checkpoints: does the pruned model actually run faster?

Median wall time of a forward pass (inference mode, eval, channels_last, autocast where it is the
fast path) after warm-up, per batch size; the speed-up is against the first checkpoint. By default
each model is timed as users deploy it: with its BNs folded into the convs before them where that
is exact (`slimctl.core.fold.fold_bn`). Params and FLOPs are the checkpoint's, counted unfolded.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from slimctl.io.checkpoint import load_checkpoint, model_from_checkpoint
from slimctl.base.device import autocast
from slimctl.errors import SlimctlError, out_of_memory_as_error
from slimctl.core.flops import count_flops, count_params
from slimctl.core.fold import batchnorm_count, fold_bn as fold_batchnorms


RUNTIMES = ("torch", "onnxruntime")


# glibc's mallopt parameters (malloc.h) and the defaults restored after timing.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD = 128 * 1024  # bytes
DEFAULT_MMAP_MAX = 65536  # allocations served by mmap at once
KEEP_TRIM_THRESHOLD = 1 << 30  # bytes: while timing, freed memory up to 1 GiB stays in the process


@functools.cache  # loaded once: every timing call asks
def _glibc() -> Any:
    """The C library's handle where it is glibc (mallopt exists), else None (macOS, Windows, musl)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def freed_memory_kept() -> Any:
    """Within the block, memory torch frees stays in the process for its next allocation, as an arena
    allocator (onnxruntime's own, jemalloc, tcmalloc) keeps it in a serving process. glibc's default
    returns large blocks to the OS (mmap above a threshold that moves with the process's history,
    trimming the heap's top), and each forward then pays page faults for fresh memory, as much as the
    process's history decides: an unpruned EfficientNet-B0 at batch 16 (torch, 2 threads) timed
    117-150 ms against 93-105 ms with memory kept, so a prune's timings and a benchmark's of the
    same two models disagreed by 15%. Elsewhere than glibc a no-op."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)


def median_ms(run: Callable[[], Any], *, repeats: int, warmup: int, sync: Callable[[], None]) -> float:
    """Median milliseconds of `run` over `repeats` calls after `warmup` ones, freed memory kept in the
    process meanwhile (`freed_memory_kept`): the steady state of a process that serves the model."""
    times = []
    with freed_memory_kept():
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            run()
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def latency_timer(
    model: nn.Module,
    *,
    batch_size: int,
    input_size: tuple[int, ...] = (3, 32, 32),
    runtime: str = "torch",
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype | None = None,
    channels_last: bool = True,
) -> Callable[..., float]:
    """A function `timer(repeats=20, warmup=3)` → the median milliseconds of one forward pass of
    `model` on a random `batch_size` batch. Build it once and call it as often as needed, e.g. in
    alternating rounds: the model is moved (torch: inference mode, eval, channels_last, autocast to
    `dtype`) or exported to ONNX and loaded in a CPU session (onnxruntime: fp32, torch's thread
    count; `pip install 'slimctl[export]'`) only here."""
    if runtime not in RUNTIMES:
        raise SlimctlError(f"unknown runtime {runtime}; use {' or '.join(RUNTIMES)}")
    if runtime == "onnxruntime":
        session, feed = _onnxruntime_session(model, batch_size=batch_size, input_size=input_size)
        return lambda repeats=20, warmup=3: median_ms(lambda: session.run(["logits"], feed), repeats=repeats,
                                                       warmup=warmup, sync=lambda: None)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).eval()
    x = torch.randn(batch_size, *input_size, device=device).contiguous(memory_format=fmt)

    @torch.inference_mode()
    def forward() -> None:
        with autocast(device, dtype):
            model(x)

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return lambda repeats=20, warmup=3: median_ms(forward, repeats=repeats, warmup=warmup, sync=sync)


def bench_checkpoints(
    paths: list[Path],
    *,
    batch_sizes: list[int],
    device: torch.device,
    dtype: torch.dtype | None,
    repeats: int = 20,
    warmup: int = 3,
    rounds: int = 3,
    fold_bn: bool = True,
    runtimes: tuple[str, ...] = ("torch",),
) -> list[dict[str, Any]]:
    """One row per (runtime, checkpoint, batch size): params, FLOPs, latency, images/s, and the
    speed-up against the first checkpoint in the same runtime.

    Latency is the median over `rounds` rounds of each round's median of `repeats` passes, the
    checkpoints alternating round after round: a shared machine's slow spell then slows them alike
    instead of one of them (timed one after the other, a pruned MobileNet-V2 at batch 16 read 1.84×
    where alternating rounds read 2.00×; docs/deploy.md).
    `fold_bn`: time each model with its BNs folded where exact (each row says so, and how many
    BNs were folded); params and FLOPs are always the checkpoint's own (unfolded) counts.
    `onnxruntime` times the model exported to ONNX (fp32, CPU; `pip install 'slimctl[export]'`)."""
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        raise SlimctlError(f"unknown runtime {', '.join(unknown)}; use {' and/or '.join(RUNTIMES)}")
    rows, timers = _timers(paths, batch_sizes=batch_sizes, device=device, dtype=dtype, fold_bn=fold_bn,
                           runtimes=runtimes)
    times: list[list[float]] = [[] for _ in rows]
    for _ in range(rounds):
        for row, timer, measured in zip(rows, timers, times):
            with out_of_memory_as_error(f"timing {row['checkpoint']} at batch size {row['batch_size']}",
                                        "--batch-sizes"):
                measured.append(timer(repeats=repeats, warmup=warmup))
    baseline: dict[tuple[str, int], float] = {}
    for row, measured in zip(rows, times):
        ms = statistics.median(measured)
        baseline.setdefault((row["runtime"], row["batch_size"]), ms)
        row.update(latency_ms=ms, images_per_sec=row["batch_size"] / ms * 1e3,
                   speedup=baseline[row["runtime"], row["batch_size"]] / ms)
    return rows


def _timers(paths: list[Path], *, batch_sizes: list[int], device: torch.device, dtype: torch.dtype | None,
            fold_bn: bool, runtimes: tuple[str, ...]) -> tuple[list[dict[str, Any]], list[Callable[..., float]]]:
    """`bench_checkpoints`' rows without their timings, in order, and a timer for each."""
    models = [(p, model_from_checkpoint(load_checkpoint(p), source=str(p))) for p in paths]
    counts = {p: {"params": count_params(m), "flops": count_flops(m)} for p, m in models}  # FLOPs: a forward pass
    rows, timers = [], []
    for runtime in runtimes:
        for path, model in models:
            timed, folded = model, 0
            if fold_bn:
                try:
                    timed = fold_batchnorms(model)
                except SlimctlError as exc:
                    raise SlimctlError(f"{path}: cannot fold its BNs: {exc} (--no-fold-bn times it unfolded)") from exc
                folded = batchnorm_count(model) - batchnorm_count(timed)
            size = tuple(model.arch_spec["input_size"])
            for bs in batch_sizes:
                with out_of_memory_as_error(f"timing {path} at batch size {bs}", "--batch-sizes"):
                    timers.append(latency_timer(timed, batch_size=bs, input_size=size, runtime=runtime,
                                                device=device, dtype=dtype))
                rows.append({"checkpoint": str(path), "runtime": runtime, **counts[path], "batch_size": bs,
                             "fold_bn": fold_bn, "bns_folded": folded})
    return rows, timers


def _onnxruntime_session(model: nn.Module, *, batch_size: int, input_size: tuple[int, ...]) -> tuple[Any, dict]:
    """`model` exported to ONNX (fp32) and loaded in an onnxruntime CPU session (its thread count
    follows torch's, i.e. --threads), with a random input batch: (session, feed). Export once, time
    as often as needed."""
    from slimctl.pipeline.export import WRITERS, needs

    needs("onnx")
    import onnxruntime

    example = torch.randn(batch_size, *input_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        WRITERS["onnx"](model.float().eval(), example, path, meta={}, opset=None, dynamic_batch=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # Idle worker threads would spin for a while after each run; with several sessions alive (a model
        # timed against another, alternating) one session's spinning steals the cores the next one runs on.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session, {"input": example.numpy()}
