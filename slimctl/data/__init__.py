"""Data sets and loaders: small image sets held as one uint8 tensor on the training device.

CIFAR-10/100 (the paper's data sets) and scikit-learn's bundled 8×8 digits (offline, for smoke
runs) all fit in device memory as uint8 (CIFAR-10 train = 50,000 × 3 × 32 × 32 bytes = 150 MB).
`TensorLoader` cuts batches out of that tensor and augments them on the device in a few batched
ops: no PIL, no worker processes, and the random stream depends only on (seed, epoch), so a
resumed run sees exactly the batches it would have seen.

CIFAR files are pickles; they are read with a restricted unpickler that only rebuilds numpy
arrays, so a tampered data file cannot run code.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slimctl.io.config import DataConfig
from slimctl.errors import SlimctlError

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "digits", "imagefolder")
TENSOR_DATASETS = ("cifar10", "cifar100", "digits")  # small enough to live on the device as uint8

# ImageNet normalisation (torchvision's pretrained weights expect it), per RGB channel.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The paper's normalisation for CIFAR (both 10 and 100), per RGB channel, in [0, 1] pixel units.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "digits": 10}

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_IMAGE_VALUES = 3 * 32 * 32  # one CIFAR row: 1024 R, then 1024 G, then 1024 B, each row-major

# scikit-learn's digits: 1797 images; a fixed split keeps 360 (20%) for testing.
_DIGITS_TEST = 360


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


def num_classes_of(name: str, root: str | Path = "data") -> int:
    """Number of classes of a data set, without loading it (imagefolder: subfolders of root/train)."""
    check_name(name)
    if name == "imagefolder":
        return len(_folder_classes(Path(root) / "train"))
    return _NUM_CLASSES[name]


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


def load_dataset(name: str, root: str | Path, *, train: bool, download: bool) -> ImageSet:
    """Load the training or test split of `name`; `root` holds the CIFAR folders (unused for digits)."""
    check_name(name)
    if name not in TENSOR_DATASETS:
        raise SlimctlError(f"{name} is read through FolderLoader (build_loaders), not as one tensor")
    if name == "digits":
        return _load_digits(train=train)
    return _load_cifar(name, Path(root), train=train, download=download)


def input_size_of(cfg: DataConfig) -> tuple[int, int, int]:
    """(C, H, W) of the images the loaders yield: data.image_size (default 224) for folders, 32×32
    for the tensor data sets (config validation allows image_size only with imagefolder)."""
    size = (cfg.image_size or 224) if cfg.name == "imagefolder" else 32
    return (3, size, size)


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
    data.seed); the training split defaults to data.subset, the test split to all of it."""
    batch_size = cfg.batch_size if train else cfg.test_batch_size
    if subset is None and train:
        subset = cfg.subset
    if cfg.name == "imagefolder":
        return FolderLoader(Path(cfg.root) / ("train" if train else "val"), train=train, batch_size=batch_size,
                            image_size=input_size_of(cfg)[-1], workers=cfg.workers, device=device, seed=cfg.seed,
                            rank=rank, world_size=world_size, channels_last=channels_last, subset=subset)
    data = load_dataset(cfg.name, cfg.root, train=train, download=cfg.download)
    if subset is not None:
        data = take_subset(data, subset, seed=cfg.seed)
    return TensorLoader(data, batch_size=batch_size, train=train, device=device, seed=cfg.seed,
                        channels_last=channels_last, rank=rank, world_size=world_size)


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


def check_name(name: str) -> None:
    """A SlimctlError naming the choices when `name` is not a data set slimctl reads."""
    if name not in DATASETS:
        raise SlimctlError(f"unknown data set {name!r}; data.name must be one of {', '.join(DATASETS)}")


def _seed64(value: int) -> int:
    """Fold any Python int into the range torch.Generator.manual_seed accepts."""
    return value & 0xFFFF_FFFF_FFFF_FFFF


# --------------------------------------------------------------------------- loader


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


# --------------------------------------------------------------------------- digits


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


# --------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class _CifarLayout:
    folder: str  # the folder inside `root`, as the official archive unpacks
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    expected: str  # for messages


_CIFAR = {
    "cifar10": _CifarLayout(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
        expected="data_batch_1..5 and test_batch",
    ),
    "cifar100": _CifarLayout(
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",
        expected="train and test",
    ),
}


def _load_cifar(name: str, root: Path, *, train: bool, download: bool) -> ImageSet:
    layout = _CIFAR[name]
    folder = root / layout.folder
    files = layout.train_files if train else layout.test_files
    # An existing copy is read as it is (no checksum): a user's own or re-encoded copy must work.
    if not all((folder / f).is_file() for f in files):
        if not download:
            raise SlimctlError(_missing_message(name, layout, folder, files))
        _download_cifar(name, root, train=train)
        if not all((folder / f).is_file() for f in files):
            raise SlimctlError(_missing_message(name, layout, folder, files))

    num_classes = _NUM_CLASSES[name]
    parts = [_read_cifar_file(folder / f, layout.label_key, num_classes) for f in files]
    data = np.concatenate([p[0] for p in parts], axis=0)  # a copy: writable and contiguous
    labels = np.concatenate([p[1] for p in parts], axis=0)
    images = torch.from_numpy(data).view(-1, 3, 32, 32)
    return ImageSet(
        images=images,
        labels=torch.from_numpy(labels),
        num_classes=num_classes,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        flip=True,
    )


def _missing_message(name: str, layout: _CifarLayout, folder: Path, files: tuple[str, ...]) -> str:
    missing = [f for f in files if not (folder / f).is_file()]
    if folder.is_dir():
        where = f"incomplete in {folder} (missing {', '.join(missing)})"
    else:
        where = f"not found in {folder}"
    return (
        f"{name} {where} (expected {layout.expected}, the python version from {CIFAR_URL}); "
        f"set data.download: true or data.root to the folder that holds {layout.folder}"
    )


def _download_cifar(name: str, root: Path, *, train: bool) -> None:
    """Fetch and unpack the official archive into `root` (torchvision verifies its md5)."""
    import torchvision

    dataset_cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        root.mkdir(parents=True, exist_ok=True)
        dataset_cls(str(root), train=train, download=True)
    except Exception as exc:  # network errors, md5 mismatch, disk full: all end the same way
        raise SlimctlError(
            f"could not download {name} to {root}: {exc}; check the network connection, or download "
            f"the python version from {CIFAR_URL} by hand, unpack it in {root} and set data.download: false"
        ) from None


def _read_cifar_file(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 N×3072 pixels, int64 N labels) from one CIFAR batch file, validated."""
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the official files were pickled by Python 2, whose str is bytes.
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except _ForbiddenGlobal as exc:
        raise SlimctlError(
            f"refusing to load {path}: it references {exc}, which a CIFAR data file never needs "
            f"(the file may be malicious); replace it with a fresh copy from {CIFAR_URL}"
        ) from None
    except OSError as exc:
        raise SlimctlError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # a damaged pickle can fail in many ways (EOFError, ValueError, ...)
        raise SlimctlError(
            f"{path} is not a readable CIFAR batch file ({type(exc).__name__}: {exc}); "
            f"replace it with a fresh copy from {CIFAR_URL}"
        ) from None

    def bad(what: str) -> SlimctlError:
        return SlimctlError(
            f"{path} is not a CIFAR batch file: {what}; replace it with a fresh copy from {CIFAR_URL}"
        )

    if not isinstance(obj, dict):
        raise bad(f"expected a pickled dict, got {type(obj).__name__}")
    # Python 2 copies have bytes keys, copies re-pickled by Python 3 have str keys.
    entries = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    for key in ("data", label_key):
        if key not in entries:
            raise bad(f"no '{key}' entry (has {', '.join(sorted(map(str, entries)))})")
    data = entries["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _IMAGE_VALUES:
        shape = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise bad(f"'data' must be a uint8 array of shape N×{_IMAGE_VALUES}, got {shape}")
    try:
        labels = np.asarray(entries[label_key])
    except Exception:
        raise bad(f"'{label_key}' is not a list of integers") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(data):
        got = f"{labels.dtype} of shape {labels.shape}"
        raise bad(f"'{label_key}' must be {len(data)} integers (one per image), got {got}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise bad(f"'{label_key}' values must be in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    return data, labels.astype(np.int64)


class _ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list; the message is `module.name`."""


def _latin1_encode(text: Any, encoding: str = "latin1") -> bytes:
    """Stand-in for `_codecs.encode`, which protocol-2 pickles written by Python 3 use for bytes."""
    if not isinstance(text, str) or encoding.lower() not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed for latin1 text")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """Everything a pickled numpy array can reference, under numpy 1.x and 2.x module names."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct  # protocols 0..4
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only; any other global is refused, so loading
    a data file can never import or call arbitrary code (plain `pickle.load` would)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_globals()
        if (module, name) not in allowed:
            raise _ForbiddenGlobal(f"{module}.{name}")
        return allowed[(module, name)]


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
