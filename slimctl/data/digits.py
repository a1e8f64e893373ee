"""scikit-learn's bundled 8×8 digits (offline, for smoke runs), upsampled to the CIFAR shape."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from slimctl.data.sets import ImageSet

# scikit-learn's digits: 1797 images; a fixed split keeps 360 (20%) for testing.
_DIGITS_TEST = 360


def read_digits(name: str, root: Path, *, train: bool, download: bool) -> ImageSet:
    """The registry's reader (sets.READERS): the digits need no root and are never downloaded."""
    return _load_digits(train=train)


def _load_digits(*, train: bool) -> ImageSet:
    """scikit-learn's 8×8 digits, upsampled to 3×32×32 uint8 (bundled with sklearn: no download).

    The split is fixed (a permutation seeded 0; the last 360 are the test set) so that it never
    depends on a run's seed: every run is evaluated on the same images.
    """
    from sklearn.datasets import load_digits

    raw = load_digits()
    pixels = torch.from_numpy(raw.images).to(torch.float32) * (255.0 / 16.0)  # values 0..16 → 0..255
    upsampled = F.interpolate(pixels[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    images = upsampled.clamp(0, 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(raw.target).to(torch.int64)

    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train_idx, test_idx = perm[:-_DIGITS_TEST], perm[-_DIGITS_TEST:]
    # Normalise with statistics of the training images only (float64 for a deterministic result).
    train_pixels = images[train_idx].to(torch.float64) / 255
    mean = tuple(float(v) for v in train_pixels.mean(dim=(0, 2, 3)))
    std = tuple(float(v) for v in train_pixels.std(dim=(0, 2, 3), correction=0))
    idx = train_idx if train else test_idx
    return ImageSet(
        images=images[idx].contiguous(),
        labels=labels[idx].contiguous(),
        num_classes=10,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        flip=False,
    )
