"""ImageNet-style folders: a small torchvision model through sparse-train → prune → finetune."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import DEMO_CONFIG
from slimctl.cli import cli
from slimctl.config import load_config
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
    result = CliRunner().invoke(cli, ["sparse-train", "-c", str(DEMO_CONFIG), "-o", str(tmp_path / "r"),
                                      "--set", "data.name=imagefolder", "--set", f"data.root={tmp_path}"])
    assert result.exit_code == 2 and "must hold train/ and val/" in result.output


def test_torchvision_model_end_to_end(folder, tmp_path):
    sets = ["--set", "data.name=imagefolder", "--set", f"data.root={folder}", "--set", "data.image_size=32",
            "--set", "data.workers=0", "--set", "data.batch_size=6", "--set", "model.arch=torchvision.resnet18",
            "--set", "model.width=1.0", "--set", "train.epochs=1", "--set", "finetune.epochs=1",
            "--set", "train.precision=fp32"]
    runner = CliRunner()
    result = runner.invoke(cli, ["sparse-train", "-c", str(DEMO_CONFIG), "-o", str(tmp_path / "s"), *sets])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["prune", str(tmp_path / "s" / "best.pt"), "--ratio", "0.5", "-o",
                                 str(tmp_path / "p.pt"), "--json"])
    assert result.exit_code == 0, result.output
    pruned = json.loads(result.output)
    assert pruned["params"] < pruned["params_before"] and pruned["top1"] is not None
    result = runner.invoke(cli, ["finetune", str(tmp_path / "p.pt"), "-c", str(DEMO_CONFIG), "-o", str(tmp_path / "f"),
                                 *sets])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["eval", str(tmp_path / "f" / "best.pt"), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["params"] == pruned["params"]
    # Evaluation reads only val/: a folder without train/ is enough (an ImageNet train/ listing takes minutes).
    val_only = tmp_path / "val_only"
    shutil.copytree(folder / "val", val_only / "val")
    result = runner.invoke(cli, ["eval", str(tmp_path / "f" / "best.pt"), "--data-root", str(val_only), "--json"])
    assert result.exit_code == 0, result.output
