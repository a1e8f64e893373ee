"""Any importable model: saved and loaded by its class's import path and plain-data arguments
(no code unpickled, nothing but an nn.Module subclass or a registered builder ever called), and
named as `model.arch: module:ClassName` in the CLI."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

import slimctl
from conftest import DEMO_CONFIG, TINY, run, sets, strongly_sparse

SOURCE = '''
import torch
from torch import nn
import slimctl

class Net(nn.Module):
    def __init__(self, channels, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn(self.conv(x))))))
        return self.head(x.mean((2, 3)))

@slimctl.register_builder
def small(num_classes=10):
    return Net(4, num_classes)

def unregistered():
    return Net(4)
'''


@pytest.fixture
def usernet(tmp_path, monkeypatch):
    (tmp_path / "usernet.py").write_text(textwrap.dedent(SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import usernet

    return importlib.reload(usernet)


def test_a_pruned_user_model_saves_and_loads_without_its_code_being_pickled(usernet, tmp_path):
    model = strongly_sparse(usernet.Net(8)).eval()
    pruned = slimctl.Slimming(model, (3, 16, 16)).prune(ratio=0.5)
    slimctl.save_model(pruned.model, tmp_path / "p.pt", args={"channels": 8})
    ckpt = slimctl.load_checkpoint(tmp_path / "p.pt")
    assert ckpt["arch"] == "usernet:Net" and ckpt["arch_args"]["args"] == {"channels": 8}
    assert ckpt["input_size"] == [3, 16, 16]
    loaded = slimctl.load_model(tmp_path / "p.pt")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned.model(x))
    assert loaded.bn.num_features < 8


def test_what_cannot_be_rebuilt_is_refused_before_anything_is_written(usernet, tmp_path):
    out = tmp_path / "p.pt"
    with pytest.raises(slimctl.SlimctlError, match="pass the constructor's keyword arguments as args"):
        slimctl.save_model(usernet.Net(8), out)  # `channels` is required
    with pytest.raises(slimctl.SlimctlError, match="not plain data"):
        slimctl.save_model(usernet.Net(8), out, args={"channels": torch.tensor(8)})

    class Local(nn.Module):
        pass

    with pytest.raises(slimctl.SlimctlError, match="defined inside a function"):
        slimctl.save_model(Local(), out)
    assert not out.exists()


@pytest.mark.parametrize("arch, message", [
    ("os:system", "standard library"),
    ("usernet:unregistered", "neither an nn.Module subclass nor a function decorated"),
    ("usernet:missing", "usernet has no missing"),
    ("nowhere_module:Net", "cannot import nowhere_module"),
    ("not a path:x", "expected package.module:ClassName"),
])
def test_an_arch_that_is_not_a_model_is_refused_before_anything_is_called(usernet, monkeypatch, arch, message):
    import os

    called = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a))
    with pytest.raises(slimctl.SlimctlError, match=message):
        slimctl.create_model(arch, 10)
    assert not called


def test_a_checkpoint_naming_another_function_is_refused(usernet, tmp_path):
    slimctl.save_model(slimctl.create_model("usernet:small", 10), tmp_path / "ok.pt")  # a registered builder
    ckpt = slimctl.load_checkpoint(tmp_path / "ok.pt")
    assert slimctl.load_model(tmp_path / "ok.pt").bn.num_features == 4
    slimctl.save_checkpoint(tmp_path / "forged.pt", {**ckpt, "arch": "os:system"})  # digested as written
    result = run("info", tmp_path / "forged.pt", code=2)
    assert "standard library" in result.output and "Traceback" not in result.output


def test_the_cli_trains_a_user_model_by_import_path(usernet, tmp_path):
    overrides = sets(*TINY, "model.arch=usernet:Net", "model.args={channels: 6}", "model.width=1")
    run("sparse-train", "-c", DEMO_CONFIG, "-o", tmp_path / "s", *overrides)
    ckpt = slimctl.load_checkpoint(tmp_path / "s" / "best.pt")
    assert ckpt["arch"] == "usernet:Net" and ckpt["num_classes"] == 10  # passed: the constructor takes it
    run("prune", tmp_path / "s" / "best.pt", "--ratio", "0.5", "-o", tmp_path / "p.pt")


@pytest.mark.parametrize("overrides, message", [
    (("model.arch=usernet:missing",), "usernet has no missing"),
    (("model.arch=usernet:Net",), "missing 1 required positional argument: 'channels'"),
    (("model.arch=vgg11", "model.args={depth: 3}"), "'model.args' is for your own model"),
    (("model.arch=usernet:Net", "model.args=[1, 2]"), "must be a mapping"),
    (("model.arch=usernet:Net", "model.args={channels: 4}", "model.width=0.5"), "model.width scales"),
])
def test_bad_import_paths_and_arguments_exit_2_in_one_line(usernet, tmp_path, overrides, message):
    out = tmp_path / "run"
    result = run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *sets(*TINY, "model.width=1", *overrides), code=2)
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()
