"""examples/: a user's own model (residual blocks, a concatenation, a squeeze-and-excitation gate)
slimmed in a plain PyTorch loop with slimctl.Slimming, and through the CLI by import path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import slimctl
from conftest import ROOT, TINY, masked_reference, rel_err, run, sets

EXAMPLES = ROOT / "examples"


@pytest.fixture
def examples_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def test_the_own_loop_example_prunes_exactly_and_reloads_bit_identically_in_a_fresh_process(
        tmp_path, examples_importable):
    from own_loop import digits, train_and_prune

    out = tmp_path / "tinynet.pt"
    model, pruned = train_and_prune(epochs=1, ratio=0.5, out=str(out), sparsity=1e-2)
    assert pruned.plan.kept < pruned.plan.total and pruned.exactness.exact
    x = digits()[:32][0]
    with torch.no_grad():  # the pruned model computes the trained one with only the removed γ zeroed
        assert rel_err(pruned.model(x), masked_reference(model, pruned.plan, zero_beta=False)(x)) < 1e-5
        expected = pruned.model(x)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch, slimctl; m = slimctl.load_model(sys.argv[1]); "
            "torch.save(m(torch.load(sys.argv[2])).detach(), sys.argv[3])")
    done = subprocess.run([sys.executable, "-c", code, out, tmp_path / "x.pt", tmp_path / "y.pt"], capture_output=True,
                          text=True, env={"PYTHONPATH": str(EXAMPLES), "PATH": "", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)
    assert slimctl.load_checkpoint(out)["arch"] == "tinynet:TinyNet"


def test_the_cli_slims_the_example_model_by_import_path(tmp_path, examples_importable):
    config = EXAMPLES / "tinynet.yaml"
    run("sparse-train", "-c", config, "-o", tmp_path / "sparse", *sets(*TINY, "train.sparsity_budget=3"))
    result = json.loads(run("prune", tmp_path / "sparse" / "best.pt", "--ratio", "0.5", "-o", tmp_path / "p.pt",
                            "--json").output)
    assert result["params"] < result["params_before"] and result["exactness"]["exact"]
    run("finetune", tmp_path / "p.pt", "-c", config, "-o", tmp_path / "ft", *sets(*TINY))
    evaluated = json.loads(run("eval", tmp_path / "ft" / "best.pt", "--json").output)
    assert evaluated["params"] == result["params"]
    run("export", tmp_path / "ft" / "best.pt", "--format", "torchscript", "-o", tmp_path / "ft.ts")
    sweep = json.loads(run("sweep", tmp_path / "sparse" / "best.pt", "--ratios", "0.5", "--json").output)
    assert [r["ratio"] for r in next(iter(sweep["curves"].values()))["rows"]] == [0.5]
    lineage = json.loads(run("report", tmp_path / "ft" / "best.pt", "--json").output)
    assert [r["stage"] for r in lineage] == ["sparse-train", "prune", "finetune"]
    assert slimctl.load_checkpoint(tmp_path / "ft" / "best.pt")["arch_args"]["args"] == {"width": 16}
