"""Your own loader in slimctl's trainer: any iterable of (images, labels) batches with a length,
e.g. a `torch.utils.data.DataLoader`, given the interface `slimctl.train.fit` uses."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class PlainLoader:
    """Batches moved to `device` (channels_last when asked), `set_epoch` handed to a sampler that
    has one (DistributedSampler), and a resumed epoch skipping the batches already trained.

    Weaker than slimctl's own loaders, whose order and augmentation are a function of (seed, epoch):
    a resumed run repeats the uninterrupted one only if this loader's order is too (a sampler that
    set_epoch reseeds, with deterministic transforms). A plain `shuffle=True` loader draws a new
    order after a resume, so the rest of that epoch sees other images than it would have; the run
    still resumes at the right step with the same weights, optimizer and learning rate.
    """

    def __init__(self, loader: Any, *, device: torch.device, channels_last: bool = False) -> None:
        self.loader, self.device = loader, device
        self.memory_format = torch.channels_last if channels_last else torch.preserve_format
        self.start_batch = 0

    @property
    def dataset_size(self) -> int:
        dataset = getattr(self.loader, "dataset", None)
        return len(dataset) if dataset is not None and hasattr(dataset, "__len__") else self.num_samples

    @property
    def num_samples(self) -> int:
        """Samples this process sees per pass (the sampler's share under torchrun)."""
        sampler = getattr(self.loader, "sampler", None)
        if sampler is not None and hasattr(sampler, "__len__"):
            return len(sampler)
        return len(self) * (getattr(self.loader, "batch_size", None) or 1)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, (x, y) in enumerate(self.loader):
            if i >= self.start_batch:
                yield (x.to(self.device, non_blocking=True, memory_format=self.memory_format),
                       y.to(self.device, non_blocking=True))
        self.start_batch = 0


def trainer_loader(loader: Any, *, device: torch.device, channels_last: bool = False) -> Any:
    """`loader` itself when it is one of slimctl's (it has set_epoch and num_samples), else a PlainLoader."""
    if hasattr(loader, "set_epoch") and hasattr(loader, "num_samples"):
        return loader
    return PlainLoader(loader, device=device, channels_last=channels_last)
