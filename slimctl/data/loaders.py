"""The on-device loader, and the loaders a `data:` config section asks for.

The tensor data sets (CIFAR-10/100, digits) all fit in device memory as uint8 (CIFAR-10 train =
50,000 × 3 × 32 × 32 bytes = 150 MB). `TensorLoader` cuts batches out of that tensor and augments
them on the device in a few batched ops: no PIL, no worker processes, and the random stream depends
only on (seed, epoch), so a resumed run sees exactly the batches it would have seen. Folder data
sets go through imagefolder.FolderLoader, which has the same interface.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from slimctl.io.config import DataConfig
from slimctl.data.imagefolder import FolderLoader
from slimctl.data.sets import (
    ImageSet, _seed64, check_global_batch, holdout_split, input_size_of, load_dataset, take_subset,
)
from slimctl.errors import SlimctlError


def build_loaders(
    cfg: DataConfig, *, device: torch.device | str, channels_last: bool = False, rank: int = 0, world_size: int = 1
) -> tuple[TensorLoader | FolderLoader, TensorLoader | FolderLoader, int]:
    """(train loader, test loader, number of classes) for a `data:` config section."""
    train, test = (build_loader(cfg, train=split, device=device, channels_last=channels_last, rank=rank,
                                world_size=world_size) for split in (True, False))
    return train, test, train.num_classes


def build_loader(
    cfg: DataConfig, *, train: bool, device: torch.device | str, channels_last: bool = False, rank: int = 0,
    world_size: int = 1, subset: int | None = None,
) -> TensorLoader | FolderLoader:
    """The training or the test loader alone (`eval` and `prune` read no training data: for an
    ImageNet folder, listing it alone takes minutes). `subset` keeps that many samples (chosen by
    data.seed); the training split defaults to data.subset, the test split to all of it. With
    data.holdout the test loader is the held-out training images and the training loader the rest."""
    batch_size = cfg.batch_size if train else cfg.test_batch_size
    if subset is None and train:
        subset = cfg.subset
    if cfg.name == "imagefolder":
        return FolderLoader(Path(cfg.root) / ("train" if train else "val"), train=train, batch_size=batch_size,
                            image_size=input_size_of(cfg)[-1], workers=cfg.workers, device=device, seed=cfg.seed,
                            rank=rank, world_size=world_size, channels_last=channels_last, subset=subset)
    # With data.holdout both loaders read the training split: the held-out images are the test loader's.
    data = load_dataset(cfg.name, cfg.root, train=train or cfg.holdout is not None, download=cfg.download)
    if cfg.holdout is not None:
        data = holdout_split(data, cfg.holdout, seed=cfg.seed, held_out=not train)
    if subset is not None:
        data = take_subset(data, subset, seed=cfg.seed)
    return TensorLoader(data, batch_size=batch_size, train=train, device=device, seed=cfg.seed,
                        channels_last=channels_last, rank=rank, world_size=world_size)



class TensorLoader:
    """The whole data set lives as one uint8 tensor on the training device; each batch is cropped,
    flipped and normalised there, batched — no PIL, no worker processes.

    Training: a fresh permutation each epoch, every sample once (the last batch may be smaller),
    zero-pad by `pad` pixels + random crop back to the image size, horizontal flip with
    probability 0.5 when the data set allows it. Evaluation (`train=False`): in order, only
    normalised. All random numbers come from a CPU generator seeded by (seed, epoch), so the
    batches are the same on every device and after a resume; call `set_epoch` before each epoch.
    """

    def __init__(
        self,
        data: ImageSet,
        *,
        batch_size: int,
        train: bool,
        device: torch.device | str = "cpu",
        seed: int = 0,
        pad: int = 4,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise SlimctlError(f"batch size must be >= 1, got {batch_size}")
        if train:
            check_global_batch(batch_size, world_size)
        if pad < 0:
            raise ValueError(f"pad must be >= 0 pixels, got {pad}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.pad = pad
        self.flip = data.flip
        self.channels_last = channels_last
        self.num_classes = data.num_classes
        # Moved once, as uint8: a float copy of the whole set would take 4× the memory.
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.mean = torch.tensor(data.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(data.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.epoch = 0
        self.start_batch = 0
        # Under torchrun each process takes a disjoint share of every global batch.
        self.rank, self.world_size = rank, world_size

    @property
    def dataset_size(self) -> int:
        """Samples in the whole split, across all processes."""
        return int(self.labels.shape[0])

    @property
    def num_samples(self) -> int:
        """Samples this process sees per pass (all of them in a single process)."""
        return sum(len(self._local(torch.arange(a, b))) for a, b in self._batch_ranges(0))

    def __len__(self) -> int:
        """Number of batches per epoch (the last one may be partial)."""
        return len(self._batch_ranges(0))

    def _batch_ranges(self, first_batch: int) -> list[tuple[int, int]]:
        """[start, stop) positions of the global batches from `first_batch` on. In training, a last
        partial batch smaller than the number of processes is dropped (every rank must step together)."""
        n = self.dataset_size
        ranges = [(a, min(a + self.batch_size, n)) for a in range(first_batch * self.batch_size, n, self.batch_size)]
        if self.train and ranges and ranges[-1][1] - ranges[-1][0] < self.world_size:
            ranges.pop()
        return ranges

    def _local(self, positions: torch.Tensor) -> torch.Tensor:
        """This process's share of a global batch: an even split, in rank order."""
        if self.world_size == 1:
            return positions
        return torch.tensor_split(positions, self.world_size)[self.rank]

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the shuffle/augmentation stream of `epoch` (a pure function of seed and epoch);
        the next pass skips its first `start_batch` batches (resuming an interrupted epoch)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.train:
            yield from self._train_batches()
        else:
            for start, stop in self._batch_ranges(0):
                local = self._local(torch.arange(start, stop, device=self.device))
                yield self._normalise(self.images[local]), self.labels[local]

    def _train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.dataset_size
        _, _, height, width = self.images.shape
        # Draw the whole epoch's randomness up front, in a fixed order, on the CPU.
        generator = torch.Generator().manual_seed(_seed64(self.seed * 1_000_003 + self.epoch))
        order = torch.randperm(n, generator=generator)
        # Crop offsets in the padded image, in pixels: 0..2*pad, pad = centred.
        top = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
        left = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        if not self.flip:
            flips.zero_()
        order, top, left, flips = (t.to(self.device) for t in (order, top, left, flips))

        rows = torch.arange(height, device=self.device)
        cols = torch.arange(width, device=self.device)
        for start, stop in self._batch_ranges(self.start_batch):
            sel = self._local(torch.arange(start, stop, device=self.device))  # positions in the epoch's order
            idx = order[sel]
            batch = self.images[idx]
            if self.pad:
                batch = F.pad(batch, (self.pad,) * 4)  # zeros, on the uint8 image as transforms.Pad does
            # Crop and flip as one gather: output pixel (i, j) reads padded pixel (top + i, left + j),
            # or (top + i, left + width - 1 - j) when flipped.
            row_idx = top[sel, None] + rows  # B×H
            col_idx = left[sel, None] + torch.where(flips[sel, None], width - 1 - cols, cols)  # B×W
            b = torch.arange(idx.shape[0], device=self.device)
            c = torch.arange(batch.shape[1], device=self.device)
            batch = batch[
                b[:, None, None, None], c[None, :, None, None], row_idx[:, None, :, None], col_idx[:, None, None, :]
            ]
            yield self._normalise(batch), self.labels[idx]

    def _normalise(self, batch: torch.Tensor) -> torch.Tensor:
        x = (batch.float() / 255 - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

