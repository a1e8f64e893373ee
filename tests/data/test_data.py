"""Data sets and the on-device loader: CIFAR readers on tiny fake folders, digits, augmentation."""

from __future__ import annotations

import dataclasses
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT
from slimctl.io.config import DataConfig
from slimctl.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    DATASETS,
    ImageSet,
    TensorLoader,
    build_loaders,
    load_dataset,
    num_classes_of,
)
from slimctl.errors import SlimctlError

MAKE_CIFAR10 = ROOT.parent / "shared" / "data" / "make_cifar10.py"

PER_FILE = 20  # images per fake batch file: the reader must not assume 10,000


# --------------------------------------------------------------------------- fake CIFAR folders


def fake_rows(n: int, offset: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 n×3072 rows; the first R pixel of row i holds its global index (offset + i)."""
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[:, 0] = np.arange(offset, offset + n) % 256
    return data


def write_batch(path: Path, entries: dict, protocol: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(entries, f, protocol=protocol)


def make_cifar10(root: Path, protocol: int = 2, str_keys: bool = False) -> Path:
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        data = fake_rows(PER_FILE, k * PER_FILE, rng)
        labels = [(k * PER_FILE + i) % 10 for i in range(PER_FILE)]
        entries = {b"batch_label": b"fake", b"data": data, b"labels": labels}
        if str_keys:
            entries = {key.decode(): value for key, value in entries.items()}
        write_batch(folder / name, entries, protocol)
    return folder


def make_cifar100(root: Path) -> Path:
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    for name, n in (("train", 30), ("test", 12)):
        labels = [(7 * i) % 100 for i in range(n)]
        write_batch(folder / name, {b"data": fake_rows(n, 0, rng), b"fine_labels": labels, b"coarse_labels": [0] * n})
    return folder


def image_set(n: int, *, flip: bool, num_classes: int | None = None, seed: int = 0, size: int = 8) -> ImageSet:
    """Random images with label i for image i (so every sample is identifiable); identity normalisation."""
    g = torch.Generator().manual_seed(seed)
    # Values 1..255: no pixel equals the zero padding, so every crop window is unambiguous.
    images = torch.randint(1, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return ImageSet(
        images=images,
        labels=torch.arange(n),
        num_classes=num_classes or n,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        flip=flip,
    )


def epoch_batches(loader: TensorLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


# --------------------------------------------------------------------------- CIFAR readers


@pytest.mark.parametrize(("protocol", "str_keys"), [(2, False), (4, False), (5, False), (4, True)])
def test_cifar10_layout(tmp_path, protocol, str_keys):
    make_cifar10(tmp_path, protocol, str_keys)
    train = load_dataset("cifar10", tmp_path, train=True, download=False)
    test = load_dataset("cifar10", str(tmp_path), train=False, download=False)

    assert train.images.shape == (5 * PER_FILE, 3, 32, 32) and test.images.shape == (PER_FILE, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.images.is_contiguous()
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == [i % 10 for i in range(5 * PER_FILE)]  # batch files in order 1..5
    assert test.labels.tolist() == [(5 * PER_FILE + i) % 10 for i in range(PER_FILE)]
    assert train.images[:, 0, 0, 0].tolist() == [i % 256 for i in range(5 * PER_FILE)]
    assert (train.num_classes, train.mean, train.std, train.flip) == (10, CIFAR_MEAN, CIFAR_STD, True)


def test_cifar_pixel_layout(tmp_path):
    """Channel c is values [1024c, 1024(c+1)) of a row, each a 32×32 image in row-major order."""
    folder = make_cifar10(tmp_path)
    row = np.zeros(3072, dtype=np.uint8)
    row[0 * 1024 + 0 * 32 + 5] = 11  # R, y=0, x=5
    row[1 * 1024 + 3 * 32 + 0] = 22  # G, y=3, x=0
    row[2 * 1024 + 31 * 32 + 30] = 33  # B, y=31, x=30
    data = np.zeros((PER_FILE, 3072), dtype=np.uint8)
    data[4] = row
    write_batch(folder / "test_batch", {b"data": data, b"labels": [1] * PER_FILE})

    image = load_dataset("cifar10", tmp_path, train=False, download=False).images[4]
    expected = torch.zeros(3, 32, 32, dtype=torch.uint8)
    expected[0, 0, 5], expected[1, 3, 0], expected[2, 31, 30] = 11, 22, 33
    assert torch.equal(image, expected)


def test_cifar100(tmp_path):
    make_cifar100(tmp_path)
    train = load_dataset("cifar100", tmp_path, train=True, download=False)
    test = load_dataset("cifar100", tmp_path, train=False, download=False)
    assert train.images.shape == (30, 3, 32, 32) and test.images.shape == (12, 3, 32, 32)
    assert train.labels.tolist() == [(7 * i) % 100 for i in range(30)]  # fine labels, not coarse
    assert train.num_classes == 100 and train.flip


def test_numpy1_module_names(tmp_path):
    """Files pickled under numpy 1.x reference numpy.core.multiarray (numpy 2 renamed it)."""
    folder = make_cifar10(tmp_path)
    data = np.full((PER_FILE, 3072), 9, dtype=np.uint8)
    blob = pickle.dumps({b"data": data, b"labels": [2] * PER_FILE}, protocol=2)
    assert b"numpy._core.multiarray\n" in blob
    (folder / "test_batch").write_bytes(blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    test = load_dataset("cifar10", tmp_path, train=False, download=False)
    assert bool((test.images == 9).all()) and test.labels.tolist() == [2] * PER_FILE


def test_missing_folder_names_it(tmp_path):
    with pytest.raises(SlimctlError) as err:
        load_dataset("cifar10", tmp_path / "nowhere", train=True, download=False)
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "data.download: true" in message and "\n" not in message
    with pytest.raises(SlimctlError, match="cifar-100-python"):
        load_dataset("cifar100", tmp_path, train=False, download=False)


def test_incomplete_folder_names_missing_file(tmp_path):
    folder = make_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(SlimctlError, match="missing data_batch_3"):
        load_dataset("cifar10", tmp_path, train=True, download=False)
    assert len(load_dataset("cifar10", tmp_path, train=False, download=False)) == PER_FILE


def test_download_failure_is_a_slimctl_error(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(SlimctlError, match="could not download cifar10.*network is unreachable"):
        load_dataset("cifar10", tmp_path, train=True, download=True)


def test_download_then_read_with_own_reader(tmp_path, monkeypatch):
    import torchvision

    calls = []

    def fake_download(root, train, download):
        calls.append((root, train, download))
        make_cifar10(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_download)
    data = load_dataset("cifar10", tmp_path, train=True, download=True)
    assert calls == [(str(tmp_path), True, True)] and len(data) == 5 * PER_FILE
    load_dataset("cifar10", tmp_path, train=True, download=True)  # present now: no second download
    assert len(calls) == 1


def _bad_entries() -> dict[str, object]:
    good = np.zeros((PER_FILE, 3072), dtype=np.uint8)
    return {
        "not a dict": [good],
        "no data key": {b"labels": [0] * PER_FILE},
        "no labels key": {b"data": good, b"fine_labels": [0] * PER_FILE},
        "wrong shape": {b"data": np.zeros((PER_FILE, 3000), dtype=np.uint8), b"labels": [0] * PER_FILE},
        "wrong dtype": {b"data": good.astype(np.float32), b"labels": [0] * PER_FILE},
        "label count": {b"data": good, b"labels": [0] * (PER_FILE - 1)},
        "label range": {b"data": good, b"labels": [10] * PER_FILE},
        "float labels": {b"data": good, b"labels": [0.5] * PER_FILE},
    }


@pytest.mark.parametrize("case", list(_bad_entries()))
def test_wrong_content_is_rejected(tmp_path, case):
    folder = make_cifar10(tmp_path)
    write_batch(folder / "test_batch", _bad_entries()[case])
    with pytest.raises(SlimctlError, match="test_batch") as err:
        load_dataset("cifar10", tmp_path, train=False, download=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("blob", [b"", np.random.default_rng(3).bytes(5000), b"\x80\x02}q\x00(U\x04data"])
def test_corrupt_bytes_are_rejected(tmp_path, blob):
    folder = make_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(blob)
    with pytest.raises(SlimctlError, match="test_batch"):
        load_dataset("cifar10", tmp_path, train=False, download=False)


@pytest.mark.parametrize("module", ["os", "posix", "builtins"])
def test_malicious_pickle_is_not_executed(tmp_path, module):
    folder = make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    name = "eval" if module == "builtins" else "system"
    code = f"open({str(marker)!r}, 'w')" if module == "builtins" else f"touch {marker}"
    # Protocol 0 by hand: call module.name(code) while unpickling.
    blob = f"c{module}\n{name}\n(V{code}\ntR.".encode()
    (folder / "test_batch").write_bytes(blob)
    with pytest.raises(SlimctlError, match=f"refusing to load .*test_batch.*{module}.{name}"):
        load_dataset("cifar10", tmp_path, train=False, download=False)
    assert not marker.exists()


@pytest.mark.skipif(not MAKE_CIFAR10.is_file(), reason="shared CIFAR-10 generator not present")
def test_generator_format_reads(tmp_path):
    """The shared generator's pickles (Python 2 str keys, protocol 4) read like the official files."""
    spec = importlib.util.spec_from_file_location("make_cifar10", MAKE_CIFAR10)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = fake_rows(PER_FILE, 0, np.random.default_rng(5))
    entry = {b"batch_label": b"testing batch 1 of 1", b"labels": list(range(10)) * 2, b"data": data,
             b"filenames": [b"x.jpg"] * PER_FILE}
    module.dump(str(folder / "test_batch"), entry)
    test = load_dataset("cifar10", tmp_path, train=False, download=False)
    assert torch.equal(test.images, torch.from_numpy(data).view(-1, 3, 32, 32))
    assert test.labels.tolist() == list(range(10)) * 2


# --------------------------------------------------------------------------- digits and names


def test_digits():
    train = load_dataset("digits", "unused", train=True, download=False)
    test = load_dataset("digits", "unused", train=False, download=False)
    assert train.images.shape == (1437, 3, 32, 32) and test.images.shape == (360, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.num_classes == 10 and set(train.labels.tolist()) == set(range(10))
    assert not train.flip and not test.flip
    assert torch.equal(train.images[:, 0], train.images[:, 2])  # grey: channels replicated
    assert int(train.images.max()) > 200  # scaled from 0..16 to 0..255
    assert train.mean == test.mean and len(train.mean) == 3 and 0 < train.std[0] < 1
    # mean/std are the training images' own: normalised, they have mean 0 and std 1.
    x = torch.cat([b for b, _ in TensorLoader(train, batch_size=500, train=False)])
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std(correction=0)) - 1) < 1e-4
    again = load_dataset("digits", "unused", train=True, download=False)
    assert torch.equal(again.images, train.images) and again.mean == train.mean


def test_names():
    assert DATASETS == ("cifar10", "cifar100", "digits", "imagefolder")
    assert [num_classes_of(n) for n in DATASETS[:3]] == [10, 100, 10]
    with pytest.raises(SlimctlError, match="data.name must be one of"):
        num_classes_of("mnist")
    with pytest.raises(SlimctlError, match="unknown data set"):
        load_dataset("svhn", "data", train=True, download=False)


# --------------------------------------------------------------------------- loader


def test_train_loader_is_deterministic_per_epoch():
    data = image_set(37, flip=True)
    a = TensorLoader(data, batch_size=8, train=True, seed=5)
    b = TensorLoader(data, batch_size=8, train=True, seed=5)
    first = epoch_batches(a, 3)
    epoch_batches(b, 7)  # another epoch in between must not change epoch 3's stream
    for (xa, ya), (xb, yb) in zip(first, epoch_batches(b, 3), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other_epoch = torch.cat([y for _, y in epoch_batches(a, 4)])
    assert not torch.equal(other_epoch, torch.cat([y for _, y in first]))
    other_seed = torch.cat([y for _, y in epoch_batches(TensorLoader(data, batch_size=8, train=True, seed=6), 3)])
    assert not torch.equal(other_seed, torch.cat([y for _, y in first]))


def test_every_sample_once_and_partial_last_batch():
    data = image_set(10, flip=True)
    loader = TensorLoader(data, batch_size=4, train=True)
    batches = epoch_batches(loader, 0)
    assert len(loader) == 3 and loader.num_samples == 10
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(10))
    x, y = batches[0]
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_test_loader_in_order_and_normalised_exactly():
    data = dataclasses.replace(image_set(9, flip=True), mean=(0.1, 0.5, 0.9), std=(0.2, 0.25, 0.3))
    loader = TensorLoader(data, batch_size=4, train=False)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [4, 4, 1] and len(loader) == 3
    x = torch.cat([b for b, _ in batches])
    assert torch.cat([y for _, y in batches]).tolist() == list(range(9))
    mean = torch.tensor([0.1, 0.5, 0.9]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    assert torch.equal(x, (data.images.float() / 255 - mean) / std)
    # A known pixel by hand: value 255 in the G channel → (1 - 0.5) / 0.25 = 2.
    data.images[0, 1, 0, 0] = 255
    first, _ = next(iter(loader))
    assert first[0, 1, 0, 0].item() == pytest.approx(2.0, abs=1e-6)
    assert torch.equal(next(iter(loader))[0], first)  # no randomness at all


def windows(image: torch.Tensor, pad: int, flip: bool) -> list[tuple[int, int, bool, torch.Tensor]]:
    """Every crop of the zero-padded image (and its mirror images when `flip`): (top, left, flipped, crop)."""
    _, h, w = image.shape
    padded = F.pad(image, (pad,) * 4)
    out = []
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            crop = padded[:, top : top + h, left : left + w]
            out.append((top, left, False, crop))
            if flip:
                out.append((top, left, True, crop.flip(-1)))
    return out


def crops_seen(data: ImageSet, loader: TensorLoader, epoch: int) -> list[tuple[int, int, bool]]:
    """For each sample of an epoch, the (top, left, flipped) window it equals; fails if none does."""
    seen = []
    for x, y in epoch_batches(loader, epoch):
        pixels = (x * 255).round().to(torch.uint8)  # identity mean/std: x is exactly uint8 / 255
        for img, label in zip(pixels, y.tolist()):
            matches = [(t, l, f) for t, l, f, crop in windows(data.images[label], loader.pad, True)
                       if torch.equal(img, crop)]
            assert matches, f"sample {label} is not a window of its zero-padded image"
            seen.append(matches[0])
    return seen


def test_crop_is_a_window_of_the_zero_padded_image():
    data = image_set(64, flip=True)
    seen = crops_seen(data, TensorLoader(data, batch_size=16, train=True, seed=1, pad=2), epoch=0)
    assert len(seen) == 64
    assert len({(t, l) for t, l, _ in seen}) > 5  # offsets vary per sample, not per batch
    assert {f for _, _, f in seen} == {True, False}  # both flipped and plain samples occur
    # Windows at the corners show the zero padding: the border is zeros, not reflected pixels.
    assert any(t in (0, 4) or l in (0, 4) for t, l, _ in seen)


def test_no_flip_when_data_forbids_it():
    data = image_set(48, flip=False)
    seen = crops_seen(data, TensorLoader(data, batch_size=16, train=True, seed=2), epoch=1)
    # Pixel values are random, so a plain window never equals a mirrored one by chance.
    assert not any(f for _, _, f in seen)


def test_digits_loader_does_not_flip():
    digits = load_dataset("digits", "unused", train=True, download=False)
    assert digits.flip is False
    small = dataclasses.replace(digits, images=digits.images[:40], labels=torch.arange(40),
                                mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    loader = TensorLoader(small, batch_size=40, train=True, seed=0)
    for x, y in epoch_batches(loader, 0):
        pixels = (x * 255).round().to(torch.uint8)
        for img, label in zip(pixels, y.tolist()):
            assert any(torch.equal(img, crop) for *_, crop in windows(small.images[label], 4, False))


def test_pad_zero_and_channels_last():
    data = image_set(6, flip=False)
    loader = TensorLoader(data, batch_size=6, train=True, pad=0, channels_last=True)
    x, y = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal((x * 255).round().to(torch.uint8), data.images[y])  # no crop, no flip: the images


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 20), batch_size=st.integers(1, 25), pad=st.integers(0, 3), seed=st.integers(0, 2**40),
       epoch=st.integers(0, 1000))
def test_loader_properties(n, batch_size, pad, seed, epoch):
    data = image_set(n, flip=True, size=6)
    loader = TensorLoader(data, batch_size=batch_size, train=True, seed=seed, pad=pad)
    batches = epoch_batches(loader, epoch)
    assert len(batches) == len(loader) == -(-n // batch_size)
    assert all(len(y) == batch_size for _, y in batches[:-1]) and 1 <= len(batches[-1][1]) <= batch_size
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(n))
    assert len(crops_seen(data, loader, epoch)) == n


def test_build_loaders_subset(tmp_path):
    make_cifar10(tmp_path)
    cfg = DataConfig(name="cifar10", root=str(tmp_path), batch_size=3, test_batch_size=8, subset=7, seed=4)
    train, test, num_classes = build_loaders(cfg, device="cpu")
    assert num_classes == 10 and train.num_samples == 7 and len(train) == 3
    assert test.num_samples == PER_FILE and len(test) == 3 and not test.train and train.train
    kept = train.images[:, 0, 0, 0].tolist()  # each fake image carries its original index here
    assert kept == sorted(kept) and len(set(kept)) == 7  # sorted by original index, no repeats

    again, _, _ = build_loaders(cfg, device="cpu")
    assert torch.equal(again.images, train.images)
    other, _, _ = build_loaders(dataclasses.replace(cfg, seed=5), device="cpu")
    assert not torch.equal(other.images, train.images)
    whole, _, _ = build_loaders(dataclasses.replace(cfg, subset=1000), device="cpu")
    assert whole.num_samples == 5 * PER_FILE
    assert torch.equal(next(iter(train))[1], next(iter(again))[1])  # the seed also fixes the batches


def test_build_loaders_digits_on_device():
    cfg = DataConfig(name="digits", batch_size=100, test_batch_size=360, seed=0)
    train, test, num_classes = build_loaders(cfg, device=torch.device("cpu"))
    assert num_classes == 10 and train.num_samples == 1437 and test.num_samples == 360
    x, y = next(iter(test))
    assert x.shape == (360, 3, 32, 32) and x.device.type == "cpu" and y.device.type == "cpu"
