"""Training throughput: slimctl's step vs a faithful rebuild of the reference training loop.

    python scripts/bench_train.py [--data ROOT] [--models vgg19,resnet164,densenet40] [--steps 15]
    python scripts/bench_train.py --device cuda --variants reference,slimctl,slimctl-cl,slimctl-compiled

All variants run in this one invocation, on the same model, batch size and data:
  reference         CIFAR arrays → PIL → Pad(4), RandomCrop(32), RandomHorizontalFlip, ToTensor,
                    Normalize in a DataLoader with one worker (pinned memory on CUDA); fp32 NCHW;
                    SGD; the per-module `updateBN` loop
  slimctl           the uint8 device-resident loader, autocast (precision auto), fused λ·sign(γ)
  slimctl-cl        the same in channels_last
  slimctl-nol1      the same with λ = 0, to price the sparsity term
  slimctl-compiled  channels_last, the step compiled (`train.compile`, mode --compile-mode); the
                    compile time is the warm-up's and is reported apart
Each (model, variant) runs in a fresh subprocess, so its peak memory is its own, and under a time
limit (--timeout), so one slow compile cannot eat the GPU's time budget. The device's fp32 and bf16 matmul
peaks are measured first; "% peak" converts images/s with the model's training FLOPs (3 × the
forward FLOPs of the paper's count). On CUDA the slimctl loops run under torch's sync debug mode
and report how many host syncs the timed steps made (the epoch's final read of its sums is one).

Without --data, random images in the CIFAR-10 on-disk layout are written to a temp folder
(throughput does not depend on pixel values).
"""

from __future__ import annotations

import itertools
import json
import pickle
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import click
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from slimctl import (CIFAR_MEAN, CIFAR_STD, COMPILE_MODES, TensorLoader, TrainStep, bn_scales, channel_groups,
                     count_flops, create_model, load_dataset, resolve_precision, train_one_epoch)

SPARSITY = 1e-4
VARIANTS = ("reference", "slimctl", "slimctl-cl", "slimctl-nol1", "slimctl-compiled")
CPU_VARIANTS = "reference,slimctl,slimctl-cl,slimctl-nol1"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, repeats: int = 10) -> float:
    """FLOP/s of an n×n matmul (2n³ FLOPs; n = 2048 on CPU, 8192 on a GPU), best of `repeats`."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def write_fake_cifar(root: Path, n: int = 10_000) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


class ReferenceCIFAR(torch.utils.data.Dataset):
    """What torchvision's CIFAR10.__getitem__ does: HWC uint8 → PIL image → transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.images = images.permute(0, 2, 3, 1).numpy()  # N×32×32×3, as torchvision stores it
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def reference_steps(model: nn.Module, data, batch_size: int, steps: int, warmup: int,
                    device: torch.device) -> float:
    """The official code's loop: PIL loader, fp32, updateBN as a Python loop over modules."""
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.Pad(4), transforms.RandomCrop(32), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
    ])
    loader = torch.utils.data.DataLoader(ReferenceCIFAR(data.images, data.labels, transform),
                                         batch_size=batch_size, shuffle=True, num_workers=1,
                                         pin_memory=device.type == "cuda")
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model.train()
    batches = iter(loader)
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        for m in model.modules():  # updateBN
            if isinstance(m, nn.BatchNorm2d):
                m.weight.grad.data.add_(SPARSITY * torch.sign(m.weight.data))
        optimizer.step()
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


def slimctl_steps(model: nn.Module, data, batch_size: int, steps: int, warmup: int, *, device: torch.device,
                  channels_last: bool, sparsity: float, compile_mode: str | None) -> dict:
    """slimctl's loop, its loader included in the timing: images/s, precision, compile seconds, host syncs."""
    dtype = resolve_precision("auto", device)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    loader = TensorLoader(data, batch_size=batch_size, train=True, device=device, channels_last=channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    gammas = bn_scales(model, [g.bn for g in channel_groups(model)])
    step = TrainStep(model, optimizer, gammas=gammas, sparsity=sparsity, device=device, dtype=dtype,
                     mode=compile_mode)
    run = lambda n: train_one_epoch(step, itertools.islice(iter(loader), n))  # noqa: E731
    started = time.perf_counter()
    run(warmup)  # compiles here (the first step, and the second: SGD's momentum buffers appear)
    compile_seconds = time.perf_counter() - started if compile_mode else 0.0
    if compile_mode and step.compiled_forward is None:
        raise RuntimeError("the compiled step fell back to eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        state = run(steps)
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchronizing" in str(w.message).lower() for w in caught) if device.type == "cuda" else None
    return {"images_per_sec": state.images / state.seconds, "precision": str(dtype or torch.float32).replace("torch.", ""),
            "compile_seconds": compile_seconds, "host_syncs": syncs}


def worker(arch: str, variant: str, data_root: Path, batch_size: int, steps: int, warmup: int, *,
           device: torch.device, width: float, compile_mode: str) -> dict:
    torch.manual_seed(0)
    data = load_dataset("cifar10", data_root, train=True, download=False)
    model = create_model(arch, 10, width=width)
    flops = count_flops(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if variant == "reference":
        row = {"images_per_sec": reference_steps(model, data, batch_size, steps, warmup, device),
               "precision": "float32", "compile_seconds": 0.0, "host_syncs": None}
    else:
        row = slimctl_steps(model, data, batch_size, steps, warmup, device=device,
                            channels_last=variant in ("slimctl-cl", "slimctl-compiled"),
                            sparsity=0.0 if variant == "slimctl-nol1" else SPARSITY,
                            compile_mode=compile_mode if variant == "slimctl-compiled" else None)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {"arch": arch, "variant": variant, **row, "train_flops_per_image": 3 * flops, "peak_mb": peak_mb}


def run_variant(arch: str, variant: str, args: list[str], timeout: float) -> dict:
    """One (model, variant) in a fresh process; a failure or a timeout is a row that says so."""
    cmd = [sys.executable, __file__, "--worker", f"{arch}:{variant}", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"arch": arch, "variant": variant, "error": f"over the {timeout:.0f} s limit"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"arch": arch, "variant": variant, "error": last[:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--data", "data_root", type=click.Path(path_type=Path), default=None,
              help="Folder holding cifar-10-batches-py (default: random images in a temp folder).")
@click.option("--models", default="vgg19,resnet164,densenet40", show_default=True)
@click.option("--variants", default=None, help=f"Comma-separated, of {', '.join(VARIANTS)} "
              f"[default: {CPU_VARIANTS} on CPU, all on CUDA].")
@click.option("--device", "device_name", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--width", type=float, default=1.0, show_default=True, help="Channel width multiplier (smoke runs).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--steps", type=int, default=15, show_default=True, help="Timed steps per variant.")
@click.option("--warmup", type=int, default=4, show_default=True, help="Untimed steps first (≥ 3 when compiling).")
@click.option("--compile-mode", type=click.Choice(COMPILE_MODES), default="reduce-overhead", show_default=True)
@click.option("--timeout", type=float, default=600, show_default=True, help="Seconds allowed per variant.")
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the rows as JSON.")
@click.option("--worker", "worker_spec", default=None, hidden=True)
def main(data_root, models, variants, device_name, width, batch_size, steps, warmup, compile_mode, timeout,
         json_out, worker_spec) -> None:
    device = torch.device(device_name)
    if worker_spec:
        arch, variant = worker_spec.split(":")
        print(json.dumps(worker(arch, variant, data_root, batch_size, steps, warmup, device=device, width=width,
                                compile_mode=compile_mode)))
        return
    variants = (variants or (CPU_VARIANTS if device.type == "cpu" else ",".join(VARIANTS))).split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise click.BadParameter(f"unknown variant(s) {', '.join(unknown)}; use {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        if data_root is None:
            data_root = Path(tmp)
            write_fake_cifar(data_root)
        peaks = {"float32": matmul_peak(torch.float32, device), "bfloat16": matmul_peak(torch.bfloat16, device)}
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
        print(f"matmul peak: fp32 {peaks['float32'] / 1e12:.2f} TFLOP/s, bf16 {peaks['bfloat16'] / 1e12:.2f} TFLOP/s "
              f"({where}, torch {torch.__version__})")
        args = ["--data", str(data_root), "--device", device_name, "--width", str(width), "--batch-size",
                str(batch_size), "--steps", str(steps), "--warmup", str(warmup), "--compile-mode", compile_mode]
        rows = []
        for arch in models.split(","):
            for variant in variants:
                row = run_variant(arch, variant, args, timeout)
                if "error" not in row:
                    row["peak_fraction"] = row["images_per_sec"] * row["train_flops_per_image"] / peaks[row["precision"]]
                rows.append(row)
                shown = row.get("error") or f"{row['images_per_sec']:8.1f} img/s"
                print(f"  {arch:<11} {variant:<17} {shown}", flush=True)
                if json_out:  # after every row: a killed run still leaves what it measured
                    json_out.write_text(json.dumps({"device": where, "peaks": peaks, "rows": rows}, indent=2))
    print_table(rows, batch_size, where)


def print_table(rows: list[dict], batch_size: int, where: str) -> None:
    print(f"\n| model | loop | precision | images/s | vs reference | % of matmul peak | compile s | host syncs | "
          f"peak MB |  (batch {batch_size}, {where})")
    print("|---|---|---|---|---|---|---|---|---|")
    for arch in dict.fromkeys(r["arch"] for r in rows):
        mine = {r["variant"]: r for r in rows if r["arch"] == arch}
        ref = mine.get("reference", {}).get("images_per_sec")
        for variant, r in mine.items():
            if "error" in r:
                print(f"| {arch} | {variant} | | failed: {r['error']} | | | | | |")
                continue
            speedup = f"{r['images_per_sec'] / ref:.2f}×" if ref else ""
            syncs = "" if r["host_syncs"] is None else str(r["host_syncs"])
            compile_s = f"{r['compile_seconds']:.0f}" if r["compile_seconds"] else ""
            print(f"| {arch} | {variant} | {r['precision']} | {r['images_per_sec']:.1f} | {speedup} | "
                  f"{100 * r['peak_fraction']:.0f}% | {compile_s} | {syncs} | {r['peak_mb']:.0f} |")
        l1, nol1 = mine.get("slimctl", {}), mine.get("slimctl-nol1", {})
        if "images_per_sec" in l1 and "images_per_sec" in nol1:
            overhead = 100 * (nol1["images_per_sec"] / l1["images_per_sec"] - 1)
            print(f"| {arch} | sparsity term overhead | | | {overhead:+.1f}% of a step | | | | |")


if __name__ == "__main__":
    main()
