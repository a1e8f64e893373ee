"""Training throughput: slimctl's step vs a faithful rebuild of the reference training loop.

    python scripts/bench_train.py [--data ROOT] [--models vgg19,resnet164,densenet40] [--steps 15]

Both run in this one invocation, on the same model, batch size and data:
  reference  CIFAR arrays → PIL → Pad(4), RandomCrop(32), RandomHorizontalFlip, ToTensor, Normalize
             in a DataLoader with one worker; fp32 NCHW; SGD; the per-module `updateBN` loop
  slimctl    the uint8 tensor-resident loader, autocast (precision auto), fused λ·sign(γ), with and
             without channels_last; and once with λ = 0 to price the sparsity term
Each (model, variant) runs in a fresh subprocess so its peak RSS is its own. The machine's fp32 and
bf16 matmul peaks are measured first; "% peak" converts images/s with the model's training FLOPs
(3 × the forward FLOPs of the paper's count).

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
from pathlib import Path

import click
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from slimctl.data import CIFAR_MEAN, CIFAR_STD, TensorLoader, load_dataset
from slimctl.flops import count_flops
from slimctl.models import create_model
from slimctl.trace import channel_groups
from slimctl.device import resolve_precision
from slimctl.sparsity import bn_scales
from slimctl.train import train_one_epoch

SPARSITY = 1e-4
VARIANTS = ("reference", "slimctl", "slimctl-cl", "slimctl-nol1")


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an n×n matmul (2n³ FLOPs), best of `repeats`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
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


def reference_steps(model: nn.Module, data, batch_size: int, steps: int, warmup: int) -> float:
    """The official code's loop: PIL loader, fp32, updateBN as a Python loop over modules."""
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.Pad(4), transforms.RandomCrop(32), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
    ])
    loader = torch.utils.data.DataLoader(ReferenceCIFAR(data.images, data.labels, transform),
                                         batch_size=batch_size, shuffle=True, num_workers=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model.train()
    batches = iter(loader)
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        x, y = next(batches)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        for m in model.modules():  # updateBN
            if isinstance(m, nn.BatchNorm2d):
                m.weight.grad.data.add_(SPARSITY * torch.sign(m.weight.data))
        optimizer.step()
    return steps * batch_size / (time.perf_counter() - start)


def slimctl_steps(model: nn.Module, data, batch_size: int, steps: int, warmup: int, *, channels_last: bool,
                  sparsity: float) -> tuple[float, str]:
    device = torch.device("cpu")
    dtype = resolve_precision("auto", device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = TensorLoader(data, batch_size=batch_size, train=True, device=device, channels_last=channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    gammas = bn_scales(model, [g.bn for g in channel_groups(model)])
    run = lambda n: train_one_epoch(model, list(itertools.islice(iter(loader), n)), optimizer, gammas=gammas,
                                    sparsity=sparsity, device=device, dtype=dtype)
    run(warmup)
    state = run(steps)
    return state.images / state.seconds, str(dtype or torch.float32).replace("torch.", "")


def worker(arch: str, variant: str, data_root: Path, batch_size: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    data = load_dataset("cifar10", data_root, train=True, download=False)
    model = create_model(arch, 10)
    flops = count_flops(model)
    if variant == "reference":
        ips, precision = reference_steps(model, data, batch_size, steps, warmup), "float32"
    else:
        ips, precision = slimctl_steps(model, data, batch_size, steps, warmup, channels_last=variant == "slimctl-cl",
                                       sparsity=0.0 if variant == "slimctl-nol1" else SPARSITY)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {"arch": arch, "variant": variant, "images_per_sec": ips, "precision": precision,
            "train_flops_per_image": 3 * flops, "peak_rss_mb": rss_mb}


@click.command()
@click.option("--data", "data_root", type=click.Path(path_type=Path), default=None,
              help="Folder holding cifar-10-batches-py (default: random images in a temp folder).")
@click.option("--models", default="vgg19,resnet164,densenet40", show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--steps", type=int, default=15, show_default=True, help="Timed steps per variant.")
@click.option("--warmup", type=int, default=4, show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None, help="Also write the rows as JSON.")
@click.option("--worker", "worker_spec", default=None, hidden=True)
def main(data_root, models, batch_size, steps, warmup, json_out, worker_spec) -> None:
    if worker_spec:
        arch, variant = worker_spec.split(":")
        print(json.dumps(worker(arch, variant, data_root, batch_size, steps, warmup)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if data_root is None:
            data_root = Path(tmp)
            write_fake_cifar(data_root)
        peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
        print(f"matmul peak: fp32 {peaks['float32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s "
              f"({torch.get_num_threads()} threads, torch {torch.__version__})")
        rows = []
        for arch in models.split(","):
            for variant in VARIANTS:
                cmd = [sys.executable, __file__, "--worker", f"{arch}:{variant}", "--data", str(data_root),
                       "--batch-size", str(batch_size), "--steps", str(steps), "--warmup", str(warmup)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                row["peak_fraction"] = row["images_per_sec"] * row["train_flops_per_image"] / peaks[row["precision"]]
                rows.append(row)
                print(f"  {arch:<11} {variant:<13} {row['images_per_sec']:8.1f} img/s", flush=True)
    print_table(rows, batch_size)
    if json_out:
        json_out.write_text(json.dumps({"peaks": peaks, "rows": rows}, indent=2))


def print_table(rows: list[dict], batch_size: int) -> None:
    print(f"\n| model | loop | precision | images/s | vs reference | % of matmul peak | peak RSS MB |  (batch {batch_size})")
    print("|---|---|---|---|---|---|---|")
    for arch in dict.fromkeys(r["arch"] for r in rows):
        mine = {r["variant"]: r for r in rows if r["arch"] == arch}
        ref = mine["reference"]["images_per_sec"]
        for variant, r in mine.items():
            print(f"| {arch} | {variant} | {r['precision']} | {r['images_per_sec']:.1f} | "
                  f"{r['images_per_sec'] / ref:.2f}× | {100 * r['peak_fraction']:.0f}% | {r['peak_rss_mb']:.0f} |")
        l1, nol1 = mine["slimctl"]["images_per_sec"], mine["slimctl-nol1"]["images_per_sec"]
        print(f"| {arch} | sparsity term overhead | | | {100 * (nol1 / l1 - 1):+.1f}% of a step | | |")


if __name__ == "__main__":
    main()
