"""`slimctl sweep`, `prune --target-flops/--target-params`, and the sparsity strength stated as an
L1 budget: on the tiny demo (digits are bundled, so there is always data)."""

from __future__ import annotations

import json

import pytest
import yaml
from torch import nn

import slimctl
from conftest import DEMO_CONFIG, TINY, run, sets
from slimctl.io.checkpoint import load_checkpoint, save_checkpoint
from slimctl.io.config import load_config
from slimctl.errors import SlimctlError
from slimctl.core.sparsity import budget_warning
from slimctl.train import lr_sum
from slimctl.pipeline.training import sparsity_strength
from slimctl.core.sweep import largest_safe_ratio, parse_ratios
from slimctl.core.targets import parse_target


@pytest.fixture(scope="module")
def sparse(tmp_path_factory, tiny_run):
    """(a folder for this module's outputs, the shared tiny run's folder)."""
    return tmp_path_factory.mktemp("sweep"), tiny_run


# --------------------------------------------------------------------------- the L1 budget


def test_budget_derives_lambda_from_the_schedule():
    train = load_config(None, ["train.sparsity_budget=0.66", "train.epochs=160"]).train
    strength = sparsity_strength(train, steps_per_epoch=782)
    # the paper's VGG recipe: λ = 1e-4 over 160 epochs × 782 steps at lr 0.1 / 0.01 / 0.001
    assert strength["sparsity"] == pytest.approx(1e-4, rel=1e-4)
    assert strength["l1_budget"] == pytest.approx(0.66)
    assert lr_sum(lr=0.1, milestones=[1], decay=0.1, epochs=2, steps_per_epoch=10) == pytest.approx(1.1)
    plain = sparsity_strength(load_config(None, ["train.sparsity=1e-4", "train.epochs=30"]).train, steps_per_epoch=782)
    assert plain["sparsity"] == 1e-4 and plain["l1_budget"] == pytest.approx(1e-4 * 782 * (15 * 0.1 + 7 * 0.01 + 8 * 0.001))


def test_conflicting_strengths_are_refused():
    with pytest.raises(SlimctlError, match="both set the sparsity strength"):
        load_config(None, ["train.sparsity=1e-4", "train.sparsity_budget=0.5"])
    with pytest.raises(SlimctlError, match="finetune.sparsity_budget"):
        load_config(None, ["finetune.sparsity_budget=0.5"])
    assert load_config(None, ["train.sparsity=0", "train.sparsity_budget=0.5"]).train.sparsity_budget == 0.5


def test_budget_warning_only_when_gamma_cannot_reach_zero():
    assert budget_warning(0.036, 0.5) is not None and "0.036" in budget_warning(0.036, 0.5)
    assert budget_warning(0.66, 0.5) is None
    assert budget_warning(0.0, 0.5) is None  # no sparsity term: nothing to warn about


def test_sparse_train_prints_and_records_the_budget(sparse, tmp_path):
    _, trained = sparse
    output = (trained / "train.log").read_text()
    resolved = yaml.safe_load((trained / "config.yaml").read_text())["sparsity_resolved"]
    assert resolved["l1_budget"] == pytest.approx(0.66) and resolved["sparsity"] > 0
    assert load_checkpoint(trained / "best.pt")["metrics"]["l1_budget"] == pytest.approx(0.66)
    assert "L1 budget 0.66" in output
    weak = run("sparse-train", "-c", DEMO_CONFIG, "-o", tmp_path / "weak",
               *sets(*TINY, "train.sparsity_budget=null", "train.sparsity=1e-4"))
    assert "warning: the L1 budget" in weak.output + weak.stderr


# --------------------------------------------------------------------------- sweep


def test_sweep_json_table_and_png(sparse):
    root, trained = sparse
    result = json.loads(run("sweep", trained / "best.pt", "--ratios", "0.2,0.6", "--subset", "100",
                            "--compare", trained / "last.pt", "--png", root / "sweep.png", "--json").output)
    assert result["images"] == 100 and set(result["curves"]) == {str(trained / "best.pt"),
                                                                 str(trained / "last.pt")}
    rows = result["curves"][str(trained / "best.pt")]["rows"]
    assert [r["ratio"] for r in rows] == [0.2, 0.6]
    assert rows[0]["params"] > rows[1]["params"] and rows[0]["threshold"] < rows[1]["threshold"]
    assert {"top1_exact", "top1_none"} <= set(rows[0])
    # each pruned model checked against what its mode promises
    assert all(0 <= r["max_rel_diff_exact"] < 1e-4 and 0 <= r["max_rel_diff_none"] < 1e-4 for r in rows)
    assert (root / "sweep.png").stat().st_size > 1000
    table = " ".join(run("sweep", trained / "best.pt", "--ratios", "0.5", "--subset", "50").output.split())
    assert "largest ratio within 0.5 points" in table and "top-1" in table  # (rich wraps at 80 columns)
    assert "rel." in table and "warning" not in table


def test_largest_safe_ratio_stops_at_the_first_drop():
    rows = [{"ratio": 0.2, "top1_exact": 90.0}, {"ratio": 0.4, "top1_exact": 88.0}, {"ratio": 0.6, "top1_exact": 89.8}]
    assert largest_safe_ratio(rows, 90.0, 0.5, "exact") == 0.2
    assert largest_safe_ratio(rows, 90.0, 2.5, "exact") == 0.6
    assert largest_safe_ratio(rows, 95.0, 0.5, "exact") is None


@pytest.mark.parametrize("text, message", [("", "empty"), ("0.5,1.2", r"must be in \[0, 1\)"), ("a,b", "comma-separated")])
def test_bad_ratio_lists(text, message):
    with pytest.raises(SlimctlError, match=message):
        parse_ratios(text)


def test_sweep_bad_input_exits_2(sparse, tmp_path):
    root, trained = sparse
    best = trained / "best.pt"
    run("sweep", best, "--ratios", "", code=2)
    run("sweep", best, "--ratios", "0.3,1.5", code=2)
    # a checkpoint whose data is not on disk: the message says how to point at it
    ckpt = load_checkpoint(best)
    ckpt["config"]["data"].update(name="cifar10", root=str(tmp_path / "nowhere"))
    save_checkpoint(tmp_path / "nodata.pt", ckpt)
    missing = run("sweep", tmp_path / "nodata.pt", "--ratios", "0.5", code=2)
    assert "--data-root" in missing.output + missing.stderr
    assert len((missing.output + missing.stderr).strip().splitlines()) <= 2


# --------------------------------------------------------------------------- prune to a target


def test_parse_target():
    assert parse_target("flops", "0.5").fraction == 0.5
    assert parse_target("flops", "400M").count == 400_000_000
    assert parse_target("params", "2.5k").count == 2500 and parse_target("params", "1200").count == 1200
    for bad in ("400X", "lots", "-3", "0", "1e400", "1e300G"):
        with pytest.raises(SlimctlError):
            parse_target("flops", bad)


def test_prune_to_a_flops_target_finds_the_smallest_ratio(sparse):
    root, trained = sparse
    best = trained / "best.pt"
    result = json.loads(run("prune", best, "--target-flops", "0.5", "-o", root / "t.pt", "--json", "--force").output)
    assert result["flops"] <= 0.5 * result["flops_before"]
    assert result["target"] == {"kind": "flops", "value": "0.5"}
    # one channel fewer removed would miss the target: the ratio is the smallest that meets it
    smaller = result["ratio"] - 1 / result["channels_total"]
    below = json.loads(run("prune", best, "--ratio", f"{smaller:.6f}", "-o", root / "s.pt", "--json", "--force",
                           "--no-eval").output)
    assert below["flops"] > 0.5 * below["flops_before"]
    params = json.loads(run("prune", best, "--target-params", "100k", "--round-to", "2", "-o", root / "p.pt",
                            "--json", "--force", "--no-eval").output)
    assert params["params"] <= 100_000
    # multiples of 2 as deployed (a layer that folding widens by one constant channel keeps an odd count)
    deployed = slimctl.fold_bn(slimctl.load_model(root / "p.pt"))
    assert all(m.out_channels % 2 == 0 for m in deployed.modules() if isinstance(m, nn.Conv2d))


def test_unreachable_and_malformed_targets_exit_2(sparse):
    root, trained = sparse
    best = trained / "best.pt"
    unreachable = run("prune", best, "--target-params", "10", "-o", root / "u.pt", code=2)
    assert "unreachable" in unreachable.output + unreachable.stderr and "left" in unreachable.output + unreachable.stderr
    assert not (root / "u.pt").exists()
    run("prune", best, "--target-flops", "3Q", "-o", root / "u.pt", code=2)
    run("prune", best, "--target-flops", "0.5", "--ratio", "0.3", "-o", root / "u.pt", code=2)
    run("prune", best, "--target-flops", "0.5", "--target-params", "0.5", "-o", root / "u.pt", code=2)


def test_prune_reports_top1_for_the_mode_and_for_none(sparse):
    root, trained = sparse
    result = json.loads(run("prune", trained / "best.pt", "--ratio", "0.5", "-o", root / "c.pt", "--json",
                            "--force").output)
    assert result["compensate"] == "exact" and result["top1"] is not None and result["top1_none"] is not None
    literal = json.loads(run("prune", trained / "best.pt", "--ratio", "0.5", "--compensate", "none",
                             "-o", root / "n.pt", "--json", "--force").output)
    assert "top1_none" not in literal and literal["top1"] == pytest.approx(result["top1_none"])
