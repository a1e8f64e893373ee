"""ImageNet-style folders: a small torchvision model through sparse-train → prune → finetune."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DEMO_CONFIG, run, sets
from slimctl.io.config import load_config
from slimctl.data import build_loaders


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog", "emu"):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.jpg")
    return root


def _cfg(folder, *extra):
    return load_config(DEMO_CONFIG, ["data.name=imagefolder", f"data.root={folder}", "data.image_size=32",
                                     "data.workers=0", "data.batch_size=4", *extra])


def test_folder_loaders(folder):
    train, val, classes = build_loaders(_cfg(folder).data, device="cpu")
    assert classes == 3 and train.dataset_size == 18 and val.dataset_size == 6
    x, y = next(iter(train))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    train.set_epoch(1)
    a = torch.cat([y for _, y in train])
    train.set_epoch(1)
    assert torch.equal(a, torch.cat([y for _, y in train]))  # the order is a function of (seed, epoch)
    assert sorted(a.tolist()) == [0] * 6 + [1] * 6 + [2] * 6
    shares = []
    for rank in (0, 1):  # two processes: disjoint, equal shares
        loader, _, _ = build_loaders(_cfg(folder).data, device="cpu", rank=rank, world_size=2)
        shares.append(loader._indices())
    assert len(shares[0]) == len(shares[1]) == 9 and not set(shares[0]) & set(shares[1])


def test_missing_folder_is_a_clear_error(tmp_path):
    result = run("sparse-train", "-c", DEMO_CONFIG, "-o", tmp_path / "r",
                 *sets("data.name=imagefolder", f"data.root={tmp_path}"), code=2)
    assert "must hold train/ and val/" in result.output


def test_torchvision_model_end_to_end(folder, tmp_path):
    overrides = sets("data.name=imagefolder", f"data.root={folder}", "data.image_size=32", "data.workers=0",
                     "data.batch_size=6", "model.arch=torchvision.resnet18", "model.width=1.0", "train.epochs=1",
                     "finetune.epochs=1", "train.precision=fp32")
    run("sparse-train", "-c", DEMO_CONFIG, "-o", tmp_path / "s", *overrides)
    pruned = json.loads(run("prune", tmp_path / "s" / "best.pt", "--ratio", "0.5", "-o", tmp_path / "p.pt",
                            "--json").output)
    assert pruned["params"] < pruned["params_before"] and pruned["top1"] is not None
    run("finetune", tmp_path / "p.pt", "-c", DEMO_CONFIG, "-o", tmp_path / "f", *overrides)
    evaluated = json.loads(run("eval", tmp_path / "f" / "best.pt", "--json").output)
    assert evaluated["params"] == pruned["params"]
    # Evaluation reads only val/: a folder without train/ is enough (an ImageNet train/ listing takes minutes).
    val_only = tmp_path / "val_only"
    shutil.copytree(folder / "val", val_only / "val")
    on_val = json.loads(run("eval", tmp_path / "f" / "best.pt", "--data-root", val_only, "--json").output)
    assert on_val["top1"] == evaluated["top1"]  # the same val/ images, read from the other folder
