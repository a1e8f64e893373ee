"""BN recalibration after pruning: statistics re-estimated from forward passes, nothing else changed."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import run
from slimctl.io.checkpoint import load_checkpoint, save_checkpoint
from slimctl.data import load_dataset
from slimctl.core.recalibrate import recalibrate_bn


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Dropout(0.5), nn.BatchNorm2d(4, momentum=0.3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 2), nn.BatchNorm1d(2))


def test_statistics_are_the_average_over_the_batches_and_nothing_else_changes():
    model = _net()
    batches = [(torch.randn(8, 3, 5, 5) * 3 + 1, torch.zeros(8)) for _ in range(3)]
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert recalibrate_bn(model, batches, device=torch.device("cpu")) == 24
    # what BN saw: the conv output with dropout off (eval), per batch; equal batches → the plain mean
    with torch.no_grad():
        outs = [model[0](x) for x, _ in batches]
    per_batch_mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs])
    per_batch_var = torch.stack([o.transpose(0, 1).reshape(4, -1).var(dim=1) for o in outs])  # unbiased, as BN keeps
    bn = model[2]
    torch.testing.assert_close(bn.running_mean, per_batch_mean.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, per_batch_var.mean(0), rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.3 and model[6].momentum == 0.1  # restored
    assert not model.training and not any(m.training for m in model.modules())
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_a_model_without_batchnorm_is_left_alone():
    model = nn.Sequential(nn.Linear(3, 2))
    assert recalibrate_bn(model, [(torch.randn(2, 3), None)], device=torch.device("cpu")) == 0


@pytest.fixture(scope="module")
def sparse(tmp_path_factory, tiny_run):
    """(the shared tiny run's best.pt, a folder for this module's outputs)."""
    return tiny_run / "best.pt", tmp_path_factory.mktemp("recal")


def test_prune_recalibrates_records_and_reports_both_top1(sparse):
    best, out = sparse
    plain = json.loads(run("prune", best, "--ratio", "0.6", "-o", out / "plain.pt", "--json").output)
    recal = json.loads(run("prune", best, "--ratio", "0.6", "--recalibrate", "200", "-o", out / "recal.pt",
                           "--json").output)
    assert plain["recalibrated_images"] == 0 and "top1_not_recalibrated" not in plain
    assert recal["recalibrated_images"] == 200
    assert recal["top1_not_recalibrated"] == pytest.approx(plain["top1"])  # the same cut, before the new statistics
    saved = load_checkpoint(out / "recal.pt")
    assert saved["prune"]["recalibrated_images"] == 200 and saved["metrics"]["top1"] == pytest.approx(recal["top1"])
    before = load_checkpoint(out / "plain.pt")["state_dict"]
    moved = [k for k in before if k.endswith("running_mean") and not torch.equal(before[k], saved["state_dict"][k])]
    assert moved, "no BN running mean changed"
    same = [k for k in before if k.endswith("weight") and torch.equal(before[k], saved["state_dict"][k])]
    assert len(same) == sum(k.endswith("weight") for k in before)  # no weight trained
    text = run("prune", best, "--ratio", "0.6", "--recalibrate", "100", "-o", out / "recal2.pt").output
    assert "BN statistics re-estimated on 100 training images" in " ".join(text.split())


def test_sweep_adds_the_recalibrated_curve_and_judges_safety_by_it(sparse):
    best, _ = sparse
    result = json.loads(run("sweep", best, "--ratios", "0.3,0.6", "--subset", "100",
                            "--recalibrate", "100000", "--json").output)
    # more than the training split holds: all of it, and the report says how many
    everything = len(load_dataset("digits", "data", train=True, download=False))
    assert result["recalibrated_images"] == everything < 100000 and result["safe_by"] == "exact_recal"
    rows = next(iter(result["curves"].values()))["rows"]
    assert all({"top1_exact", "top1_none", "top1_exact_recal"} <= set(r) for r in rows)
    table = " ".join(run("sweep", best, "--ratios", "0.5", "--subset", "50",
                         "--recalibrate", "50").output.split())
    assert "re-estimated on 50 training images" in table
    assert table.count("top-1") == 4  # the title and three columns: exact, none, exact_recal


def test_recalibrate_bad_input_exits_2_and_writes_nothing(sparse, tmp_path):
    best, _ = sparse
    run("prune", best, "--ratio", "0.5", "--recalibrate", "-5", "-o", tmp_path / "x.pt", code=2)
    assert not (tmp_path / "x.pt").exists()
    ckpt = load_checkpoint(best)
    ckpt["config"]["data"].update(name="cifar10", root=str(tmp_path / "nowhere"))
    save_checkpoint(tmp_path / "nodata.pt", ckpt)
    (tmp_path / "keep.pt").write_bytes(b"precious")
    missing = run("prune", tmp_path / "nodata.pt", "--ratio", "0.5", "--recalibrate", "100", "-o",
                  tmp_path / "keep.pt", "--force", code=2)
    message = (missing.output + missing.stderr).strip()
    assert "--recalibrate needs the training split" in message and "--data-root" in message
    assert message.startswith("Error:") and len(message.splitlines()) <= 2  # one message, wrapped by the console
    assert (tmp_path / "keep.pt").read_bytes() == b"precious"
    run("sweep", tmp_path / "nodata.pt", "--ratios", "0.5", "--recalibrate", "100", code=2)
