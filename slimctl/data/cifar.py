"""CIFAR-10/100, the paper's data sets: the python version's folder layout, the download through
torchvision (which verifies the archive's md5), and the batch-file reader.

CIFAR files are pickles; they are read with a restricted unpickler that only rebuilds numpy
arrays, so a tampered data file cannot run code.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimctl.data.sets import _NUM_CLASSES, ImageSet
from slimctl.errors import SlimctlError

# The paper's normalisation for CIFAR (both 10 and 100), per RGB channel, in [0, 1] pixel units.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_IMAGE_VALUES = 3 * 32 * 32  # one CIFAR row: 1024 R, then 1024 G, then 1024 B, each row-major


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

