"""Fine-tuning with knowledge distillation (`finetune.distill`)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import DEMO_CONFIG, ROOT, TINY, run, sets
from slimctl import load_model
from slimctl.io.checkpoint import load_checkpoint
from slimctl.train import Distill, TrainStep

CPU = torch.device("cpu")


def nets():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(4, 10))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval().requires_grad_(False)
    return student, teacher


def step_once(student, distill):
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    step = TrainStep(student, optimizer, gammas=[student[1].weight], sparsity=0.0, device=CPU, dtype=None,
                     distill=distill)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 3, 8, 8, generator=gen), torch.randint(0, 10, (6,), generator=gen)
    return step(x, y)[0], x, y


def test_alpha_zero_is_bit_identical_to_plain_fine_tuning():
    plain, _ = nets()
    distilled, teacher = nets()
    loss_plain, _, _ = step_once(plain, None)
    loss_kd, _, _ = step_once(distilled, Distill(teacher, alpha=0.0, temperature=4.0))
    assert torch.equal(loss_plain, loss_kd)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), distilled.state_dict().values()))


def test_the_loss_is_the_documented_mix_and_the_teacher_stays_untouched():
    student, teacher = nets()
    before = copy.deepcopy(teacher.state_dict())
    reference = copy.deepcopy(student)
    loss, x, y = step_once(student, Distill(teacher, alpha=0.7, temperature=3.0))
    logits, target = reference(x), teacher(x)
    kl = (F.softmax(target / 3, 1) * (F.log_softmax(target / 3, 1) - F.log_softmax(logits / 3, 1))).sum(1).mean()
    expected = 0.3 * F.cross_entropy(logits, y) + 0.7 * 9 * kl
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_run):
    root = tmp_path_factory.mktemp("kd")
    run("prune", tiny_run / "best.pt", "--ratio", "0.5", "-o", root / "pruned.pt", "--no-eval")
    return root


def test_finetune_distills_from_the_parent_by_default_and_records_it(pruned, tiny_run, tmp_path):
    out = tmp_path / "kd"
    result = run("finetune", pruned / "pruned.pt", "-c", DEMO_CONFIG, "-o", out,
                 *sets(*TINY, "finetune.distill.alpha=0.5"))
    assert f"distilling from {tiny_run / 'best.pt'}" in result.output
    metrics = load_checkpoint(out / "best.pt")["metrics"]
    assert metrics["distill"] == {"teacher": str(tiny_run / "best.pt"), "alpha": 0.5, "temperature": 4.0}
    plain = tmp_path / "plain"
    run("finetune", pruned / "pruned.pt", "-c", DEMO_CONFIG, "-o", plain, *sets(*TINY))
    assert "distill" not in load_checkpoint(plain / "best.pt")["metrics"]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(load_model(out / "last.pt")(x), load_model(plain / "last.pt")(x))


def test_a_distilled_run_resumes_bit_identically(pruned, tmp_path):
    kd = ("finetune.distill.alpha=0.5",)
    run("finetune", pruned / "pruned.pt", "-c", DEMO_CONFIG, "-o", tmp_path / "straight",
        *sets(*TINY, *kd, "finetune.epochs=2"))
    run("finetune", pruned / "pruned.pt", "-c", DEMO_CONFIG, "-o", tmp_path / "split", *sets(*TINY, *kd))
    run("finetune", pruned / "pruned.pt", "-c", DEMO_CONFIG, "-o", tmp_path / "split",
        *sets(*TINY, *kd, "finetune.epochs=2"), "--resume")
    straight, split = (load_checkpoint(tmp_path / name / "last.pt")["state_dict"] for name in ("straight", "split"))
    assert all(torch.equal(straight[k], split[k]) for k in straight)


def test_bad_distillation_settings_are_exit_2(pruned, tmp_path):
    from slimctl import make_checkpoint, save_checkpoint
    from slimctl.models import create_model

    hundred = tmp_path / "hundred.pt"  # a teacher for other classes
    save_checkpoint(hundred, make_checkpoint(create_model("vgg11", 100, width=0.25), stage="sparse-train"))
    cases = [
        (("finetune.distill.alpha=1.5",), "finetune.distill.alpha' must be in [0, 1]"),
        (("finetune.distill.alpha=0.5", "finetune.distill.temperature=0"), "must be > 0"),
        (("finetune.distill.alpha=0.5", f"finetune.distill.teacher={tmp_path / 'nope.pt'}"), "does not exist"),
        (("finetune.distill.alpha=0.5", f"finetune.distill.teacher={hundred}"), "predicts 100 classes"),
    ]
    for extra, message in cases:
        result = run("finetune", pruned / "pruned.pt", "-c", DEMO_CONFIG, "-o", tmp_path / "x", *sets(*TINY, *extra),
                     code=2)
        assert message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- scratch


def test_scratch_trains_the_same_architecture_from_fresh_weights(pruned, tmp_path):
    out = tmp_path / "scratch"
    result = run("scratch", pruned / "pruned.pt", "-c", DEMO_CONFIG, "-o", out, *sets(*TINY))
    assert "scratch (epochs budget): 1 epochs from fresh weights" in result.output
    source, fresh = load_checkpoint(pruned / "pruned.pt"), load_checkpoint(out / "last.pt")
    assert fresh["widths"] == source["widths"] and fresh["stage"] == "scratch"
    assert fresh["parent"]["path"] == str((pruned / "pruned.pt").resolve())
    assert {k: v.shape for k, v in fresh["state_dict"].items()} == {k: v.shape for k, v in source["state_dict"].items()}
    conv = next(k for k in source["state_dict"] if k.endswith("conv0.weight"))
    assert not torch.equal(fresh["state_dict"][conv], source["state_dict"][conv])
    assert fresh["config"]["train"]["sparsity"] == 0.0 and fresh["config"]["train"]["sparsity_budget"] is None
    lineage = json.loads(run("report", out / "best.pt", "--json").output)
    assert [r["stage"] for r in lineage] == ["sparse-train", "prune", "scratch"]


def test_fresh_weights_use_the_paper_init_and_no_compensation(pruned):
    from slimctl.base.inserted import ConstantResponse
    from slimctl.pipeline.training import fresh_like

    torch.manual_seed(0)
    model = fresh_like(load_checkpoint(pruned / "pruned.pt"))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 0.5) and torch.all(m.bias == 0) for m in bns)  # the paper's γ start
    responses = [m for m in model.modules() if isinstance(m, ConstantResponse)]
    assert responses and all(not m.bias.any() and not m.kernel.any() for m in responses)


@pytest.mark.parametrize("epochs, unpruned, pruned_flops, expected", [
    (30, 100, 50, 60),  # half the FLOPs: twice the epochs
    (30, 100, 80, 38),  # 1.25× → 37.5 → 38
    (30, 100, 10, 60),  # 10× fewer FLOPs: capped at 2×
    (30, 100, 100, 30),  # nothing removed
])
def test_scratch_b_epochs_follow_the_flops_with_a_2x_cap(epochs, unpruned, pruned_flops, expected):
    from slimctl.pipeline.training import scratch_epochs

    assert scratch_epochs(epochs, "flops", unpruned_flops=unpruned, pruned_flops=pruned_flops) == expected
    assert scratch_epochs(epochs, "epochs", unpruned_flops=unpruned, pruned_flops=pruned_flops) == epochs


def test_scratch_b_records_the_scaled_schedule(pruned, tmp_path):
    out = tmp_path / "b"
    run("scratch", pruned / "pruned.pt", "-c", DEMO_CONFIG, "-o", out, *sets(*TINY, "train.epochs=2"),
        "--budget", "flops")
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["config"]["train"]["epochs"] == 4  # 50% pruned removes > half the FLOPs: the 2× cap
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4


def test_bench_distill_times_both_variants_on_the_same_model(pruned, tiny_run):
    """scripts/bench_distill.py: the README's cost of distillation (images/s with and without)."""
    script = ROOT / "scripts" / "bench_distill.py"
    done = subprocess.run([sys.executable, script, pruned / "pruned.pt", "-c", DEMO_CONFIG, "--steps", "2",
                           "--rounds", "1", "--warmup", "1", "--batch-size", "8"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| fine-tune")]
    assert len(rows) == 2 and rows[0].endswith("| 1.00× |") and "alpha 0.5" in rows[1]
    assert f"teacher {tiny_run / 'best.pt'}" in done.stdout
    bad = subprocess.run([sys.executable, script, pruned / "pruned.pt", "-c", DEMO_CONFIG, "--alpha", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "alpha > 0" in bad.stderr and "Traceback" not in bad.stderr


def test_a_replaced_parent_is_said_and_never_taken_as_the_teacher(tmp_path, tiny_run):
    import shutil

    parent = tmp_path / "sparse.pt"
    shutil.copy(tiny_run / "best.pt", parent)
    run("prune", parent, "--ratio", "0.5", "-o", tmp_path / "pruned.pt", "--no-eval")
    assert [r["stage"] for r in json.loads(run("report", tmp_path / "pruned.pt", "--json").output)] == \
        ["sparse-train", "prune"]
    shutil.copy(tiny_run / "last.pt", parent)  # another file at the recorded path
    result = run("report", tmp_path / "pruned.pt", "--json")
    rows = json.loads(result.output[result.output.index("["):])
    assert [r["stage"] for r in rows] == ["prune"] and rows[0]["parent_replaced"] == str(parent.resolve())
    assert "was replaced since" in result.output
    refused = run("finetune", tmp_path / "pruned.pt", "-c", DEMO_CONFIG, "-o", tmp_path / "kd",
                  *sets(*TINY, "finetune.distill.alpha=0.5"), code=2)
    assert "was replaced since it was recorded" in refused.output and not (tmp_path / "kd").exists()
    assert "checkpoint not found" in run("report", tmp_path / "missing.pt", code=2).output
