"""The data sets slimctl reads: their names, the in-memory split (`ImageSet`), and what is known or
done without a particular source — class counts, loading by name, input size, seeded subsets.

The readers themselves live in one module per source (cifar, digits, imagefolder); they import
`ImageSet` from here, so this module cannot import them: it dispatches through `READERS` and
`CLASS_COUNTERS`, which slimctl.data (the package's __init__) fills in, in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from slimctl.io.config import DataConfig
from slimctl.errors import SlimctlError

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "digits", "imagefolder")
TENSOR_DATASETS = ("cifar10", "cifar100", "digits")  # small enough to live on the device as uint8

_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "digits": 10}


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value to compare by
class ImageSet:
    """A whole split in memory. `images` is uint8 N×3×H×W on the CPU, contiguous."""

    images: torch.Tensor
    labels: torch.Tensor  # int64, N
    num_classes: int
    # Per-channel normalisation, in [0, 1] pixel units (i.e. after dividing uint8 values by 255).
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Whether a horizontal flip keeps the label valid (true for photos, false for digits).
    flip: bool

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# The registry, filled in by slimctl.data's __init__ (importing any module of the package runs it first):
# each tensor data set's reader, (name, root, *, train, download) → ImageSet, and each folder data set's
# class counter, root → number of classes (the data sets absent here have a fixed count, _NUM_CLASSES).
READERS: dict[str, Callable[..., ImageSet]] = {}
CLASS_COUNTERS: dict[str, Callable[[Path], int]] = {}


def num_classes_of(name: str, root: str | Path = "data") -> int:
    """Number of classes of a data set, without loading it (imagefolder: subfolders of root/train)."""
    check_name(name)
    if name in CLASS_COUNTERS:
        return CLASS_COUNTERS[name](Path(root))
    return _NUM_CLASSES[name]


def load_dataset(name: str, root: str | Path, *, train: bool, download: bool) -> ImageSet:
    """Load the training or test split of `name`; `root` holds the CIFAR folders (unused for digits)."""
    check_name(name)
    if name not in TENSOR_DATASETS:
        raise SlimctlError(f"{name} is read through FolderLoader (build_loaders), not as one tensor")
    return READERS[name](name, Path(root), train=train, download=download)


def input_size_of(cfg: DataConfig) -> tuple[int, int, int]:
    """(C, H, W) of the images the loaders yield: data.image_size (default 224) for folders, 32×32
    for the tensor data sets (config validation allows image_size only with imagefolder)."""
    size = (cfg.image_size or 224) if cfg.name == "imagefolder" else 32
    return (3, size, size)


def check_global_batch(batch_size: int, world_size: int) -> None:
    """Under torchrun the configured batch is global and is split evenly over the processes."""
    if batch_size % world_size:
        raise SlimctlError(
            f"data.batch_size {batch_size} is the global batch and must be divisible by the "
            f"{world_size} processes; use a multiple of {world_size}"
        )


def take_subset(data: ImageSet, size: int, *, seed: int) -> ImageSet:
    """Keep at most `size` samples, chosen by a permutation seeded with `seed`, in their original order.

    Mean/std stay those of the full set, so a subset run normalises like a full run.
    """
    n = len(data)
    if size >= n:
        return data
    generator = torch.Generator().manual_seed(_seed64(seed))
    keep = torch.randperm(n, generator=generator)[:size].sort().values
    return replace(data, images=data.images[keep].contiguous(), labels=data.labels[keep].contiguous())


def holdout_split(data: ImageSet, size: int, *, seed: int, held_out: bool) -> ImageSet:
    """The `size` samples a permutation seeded with `seed` holds out (`held_out`), or all the others;
    either part in its original order. A validation split carved from the training set."""
    n = len(data)
    if size >= n:
        raise SlimctlError(f"data.holdout {size} leaves no training images (the training split has {n:,}); "
                           f"hold out fewer, e.g. {max(1, n // 10):,}")
    generator = torch.Generator().manual_seed(_seed64(seed + 0x5EED))  # a stream apart from take_subset's
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[torch.randperm(n, generator=generator)[:size]] = True
    keep = torch.nonzero(chosen if held_out else ~chosen).flatten()
    return replace(data, images=data.images[keep].contiguous(), labels=data.labels[keep].contiguous())


def check_name(name: str) -> None:
    """A SlimctlError naming the choices when `name` is not a data set slimctl reads."""
    if name not in DATASETS:
        raise SlimctlError(f"unknown data set {name!r}; data.name must be one of {', '.join(DATASETS)}")


def _seed64(value: int) -> int:
    """Fold any Python int into the range torch.Generator.manual_seed accepts."""
    return value & 0xFFFF_FFFF_FFFF_FFFF
