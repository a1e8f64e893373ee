"""torchvision models through the same pipeline: traced groups, checkpoints, prune, groups, weights."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import ROOT, randomize_bn, run
from slimctl import load_model, make_checkpoint, save_checkpoint
from slimctl.errors import SlimctlError
from slimctl.models import create_model
from slimctl.pipeline.training import load_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoint(tmp_path, arch):
    torch.manual_seed(0)
    model = randomize_bn(create_model(arch, 10, input_size=(3, 64, 64))).eval()
    path = tmp_path / "model.pt"
    save_checkpoint(path, make_checkpoint(model, stage="sparse-train"))
    return path


@pytest.mark.parametrize("arch", ["torchvision.resnet18", "torchvision.densenet121", "torchvision.mobilenet_v2"])
def test_prune_a_torchvision_checkpoint_twice(tmp_path, arch):
    path = _checkpoint(tmp_path, arch)
    first = json.loads(run("prune", path, "--ratio", "0.5", "-o", tmp_path / "p1.pt", "--no-eval", "--json").output)
    assert first["params"] < first["params_before"] and first["flops"] < first["flops_before"]
    pruned = load_model(tmp_path / "p1.pt")  # rebuilt from the checkpoint alone (selections included)
    with torch.no_grad():
        assert pruned(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    second = json.loads(run("prune", tmp_path / "p1.pt", "--ratio", "0.3", "-o", tmp_path / "p2.pt", "--no-eval",
                            "--json").output)
    assert second["params_before"] == first["params"] and second["params"] < first["params"]
    info = json.loads(run("info", tmp_path / "p2.pt", "--json").output)
    assert info["params"] == second["params"] and info["arch"] == arch


def test_coupled_sets_prune_only_when_asked(tmp_path):
    path = _checkpoint(tmp_path, "torchvision.resnet18")
    keep = json.loads(run("prune", path, "--ratio", "0.5", "-o", tmp_path / "k.pt", "--no-eval", "--json").output)
    joint = json.loads(run("prune", path, "--ratio", "0.5", "-o", tmp_path / "m.pt", "--no-eval", "--coupled", "max",
                           "--json").output)
    assert len(joint["layers"]) > len(keep["layers"])  # the residual sets are ranked too


def test_groups_command(tmp_path):
    rows = json.loads(run("groups", "torchvision.mobilenet_v2", "--json").output)
    kinds = {r["kind"] for r in rows}
    assert {"depthwise", "frozen"} <= kinds
    assert all(r["reason"] for r in rows if r["kind"] == "frozen")
    assert "members" in run("groups", "torchvision.resnet18", "--explain").output
    declared = json.loads(run("groups", "resnet164", "--json").output)
    assert {r["kind"] for r in declared} == {"free", "selection"}
    result = run("groups", "torchvision.squeezenet1_0", code=2)
    assert "no BatchNorm2d" in result.output and "Traceback" not in result.output
    run("groups", "nonsense", code=2)


def test_pretrained_weights_from_a_state_dict_file(tmp_path):
    source = create_model("torchvision.resnet18", 1000)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    model = create_model("torchvision.resnet18", 10)
    load_pretrained(model, str(tmp_path / "r18.pth"), log=lambda *a: None)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.weight.shape == (10, 512)  # the head for other classes stays fresh
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(SlimctlError, match="cannot read"):
        load_pretrained(model, str(tmp_path / "junk.pth"))
    with pytest.raises(SlimctlError, match="neither a file nor a torchvision weights name"):
        load_pretrained(model, "NoSuch_Weights.X")


def test_bench_torchvision_script(tmp_path):
    """The script behind the README's per-model table: counts by space kind, the prune shrinks the model."""
    script = ROOT / "scripts" / "bench_torchvision.py"
    rows_file = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, script, "--models", "resnet18", "--size", "32", "--repeats", "1",
                           "--batch-sizes", "1,2", "--markdown", "--json-out", rows_file],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    # resnet18: 8 free spaces shrink; 4 residual-coupled sets, the input and the logits keep their width.
    assert done.stdout.splitlines()[2].startswith("| resnet18 | 20 | 8 / 0 / 6 |")
    [row] = json.loads(rows_file.read_text())
    assert row["params"] < row["params_before"] and row["flops"] < row["flops_before"]
    assert set(row["latency"]) == {"1", "2"} and all(ms > 0 for pair in row["latency"].values() for ms in pair)
    bad = subprocess.run([sys.executable, script, "--models", "no_such_net"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no_such_net" in bad.stderr and "Traceback" not in bad.stderr


def test_googlenet_builds_without_torchvisions_future_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = create_model("torchvision.googlenet", 10)
    assert model.aux1 is not None  # torchvision's defaults otherwise: aux heads on
