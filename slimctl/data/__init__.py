"""Data sets and loaders: small image sets held as one uint8 tensor on the training device.

CIFAR-10/100 (the paper's data sets) and scikit-learn's bundled 8×8 digits (offline, for smoke
runs) all fit in device memory as uint8 (CIFAR-10 train = 50,000 × 3 × 32 × 32 bytes = 150 MB).
`TensorLoader` cuts batches out of that tensor and augments them on the device in a few batched
ops: no PIL, no worker processes, and the random stream depends only on (seed, epoch), so a
resumed run sees exactly the batches it would have seen.

CIFAR files are pickles; they are read with a restricted unpickler that only rebuilds numpy
arrays, so a tampered data file cannot run code.

The modules, top-down:

- `loaders`: `TensorLoader` (uint8 tensors augmented on the device) and `build_loader(s)`, the
  loaders a `data:` config section asks for.
- `imagefolder`: ImageNet-style folders, read by `FolderLoader` through a DataLoader with workers.
- `cifar`: CIFAR-10/100 — the folder layout, the checksum-verified download through torchvision,
  the batch-file reader and its restricted unpickler.
- `digits`: scikit-learn's bundled 8×8 digits.
- `sets`: the data set names, `ImageSet` (a whole split in memory), and loading by name through a
  registry of readers that this file fills in (the sources import `ImageSet` from `sets`, so `sets`
  cannot import them).
"""

from __future__ import annotations

from slimctl.data.cifar import CIFAR_MEAN, CIFAR_STD, CIFAR_URL, _load_cifar
from slimctl.data.digits import read_digits
from slimctl.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, FolderLoader, count_classes
from slimctl.data.loaders import TensorLoader, build_loader, build_loaders
from slimctl.data.plain import PlainLoader, trainer_loader
from slimctl.data.sets import (
    CLASS_COUNTERS,
    DATASETS,
    READERS,
    TENSOR_DATASETS,
    ImageSet,
    check_global_batch,
    check_name,
    input_size_of,
    load_dataset,
    num_classes_of,
    take_subset,
)

# The registry, in one place: which source reads each data set.
READERS.update(cifar10=_load_cifar, cifar100=_load_cifar, digits=read_digits)
CLASS_COUNTERS.update(imagefolder=count_classes)

__all__ = [
    "PlainLoader",
    "trainer_loader",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "CIFAR_URL",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TENSOR_DATASETS",
    "FolderLoader",
    "ImageSet",
    "TensorLoader",
    "build_loader",
    "build_loaders",
    "check_global_batch",
    "check_name",
    "input_size_of",
    "load_dataset",
    "num_classes_of",
    "take_subset",
]
