"""ImageNet-style folders (root/train and root/val, one subfolder of images per class): too big to
hold on the device, so `FolderLoader` reads them through a DataLoader with worker processes."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from slimctl.data.sets import _seed64, check_global_batch
from slimctl.errors import SlimctlError

# ImageNet normalisation (torchvision's pretrained weights expect it), per RGB channel.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def count_classes(root: Path) -> int:
    """The registry's class counter (sets.CLASS_COUNTERS): the subfolders of root/train."""
    return len(_folder_classes(root / "train"))


def _folder_classes(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise SlimctlError(
            f"imagefolder: {folder} not found; data.root must hold train/ and val/, each with one "
            "subfolder of images per class (the ImageNet layout)"
        )
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise SlimctlError(f"imagefolder: {folder} has no class subfolders")
    return classes


class FolderLoader:
    """ImageNet-style folders through a DataLoader with worker processes (too big for the device).

    Train: RandomResizedCrop(image_size), horizontal flip, normalise; val: resize to image_size·256/224,
    centre crop, normalise. The same interface as TensorLoader: under torchrun each rank takes an
    equal share of a seeded permutation (`_indices`); `set_epoch` makes it a function of (seed, epoch).
    """

    def __init__(self, folder: Path, *, train: bool, batch_size: int, image_size: int, workers: int,
                 device: torch.device | str, seed: int, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False, subset: int | None = None) -> None:
        from torchvision import datasets, transforms

        if train:
            check_global_batch(batch_size, world_size)
        _folder_classes(folder)
        normalise = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        if train:
            steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
        else:
            steps = [transforms.Resize(int(round(image_size * 256 / 224))), transforms.CenterCrop(image_size)]
        self.dataset = datasets.ImageFolder(folder, transforms.Compose(steps + normalise))
        if not len(self.dataset):
            raise SlimctlError(f"imagefolder: no images found under {folder}")
        self.source = self.dataset
        if subset is not None and subset < len(self.dataset):
            keep = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(seed))[:subset]
            self.source = torch.utils.data.Subset(self.dataset, sorted(keep.tolist()))
        self.train, self.seed, self.workers = train, seed, workers
        self.device, self.channels_last = torch.device(device), channels_last
        self.local_batch = max(1, batch_size // world_size)
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    @property
    def dataset_size(self) -> int:
        return len(self.source)

    @property
    def num_classes(self) -> int:
        return len(self.dataset.classes)

    @property
    def num_samples(self) -> int:
        return len(self._indices())

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.local_batch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _indices(self) -> list[int]:
        """This rank's sample order for the epoch: a seeded permutation, dealt out in rank order."""
        n = len(self.source)
        if not self.train:
            order = torch.arange(n)
        else:
            generator = torch.Generator().manual_seed(_seed64(self.seed * 1_000_003 + self.epoch))
            order = torch.randperm(n, generator=generator)
            if self.world_size > 1:  # equal shares, so every rank takes the same number of steps
                order = order[: n // self.world_size * self.world_size]
        return order[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self._indices()[self.start_batch * self.local_batch :]
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.source, indices), batch_size=self.local_batch, shuffle=False,
            num_workers=self.workers, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(_seed64(self.seed * 7919 + self.epoch)),  # workers' aug seeds
        )
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for x, y in loader:
            yield x.to(self.device, non_blocking=True).contiguous(memory_format=fmt), y.to(self.device, non_blocking=True)
