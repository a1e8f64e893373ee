"""scripts/gpu_check.sh --dry-run: the GPU check script runs end to end on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_the_gpu_script_runs_every_phase_on_the_cpu_and_leaves_its_results_in_out(tmp_path):
    out = dry_run(tmp_path)
    # What the device tool brings back: at most 8 plain files, no subfolders.
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() for f in files) and len(files) <= 8
    assert {"env.txt", "log.txt", "bench.md", "summary.md", "runs.tar.gz"} <= set(files)
    bench = json.loads((out / "bench_vgg19.json").read_text())["rows"]
    assert {r["variant"] for r in bench} == {"reference", "slimctl", "slimctl-cl"}
    assert all(r["images_per_sec"] > 0 for r in bench)
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"runs/sparse/metrics.jsonl", "runs/finetune/metrics.jsonl", "runs/sweep.json", "runs/prune.json",
            "runs/report.json"} <= names
    assert not any(n.endswith(".pt") for n in names)
    report = json.loads(tar_member(out / "runs.tar.gz", "runs/report.json"))
    assert [s["stage"] for s in report][-3:] == ["sparse-train", "prune", "finetune"]
    summary = (out / "summary.md").read_text()
    assert "- sparse: 1 epochs" in summary and "- finetune: 1 epochs" in summary


def dry_run(tmp_path: Path, *args: str) -> Path:
    """`gpu_check.sh --dry-run ARGS` on the CPU; its OUT folder."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--runs", str(tmp_path / "runs"),
                           *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def tar_member(path: Path, name: str) -> str:
    with tarfile.open(path) as tar:
        return tar.extractfile(name).read().decode()


@pytest.mark.slow
def test_the_cpu_repro_plan_runs_baseline_and_sparse_side_by_side_then_sweeps_prunes_and_finetunes(tmp_path):
    out = dry_run(tmp_path, "--plan", "cpu-repro-vgg", "--no-bench")
    assert not (out / "bench.md").exists()
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = set(tar.getnames())
    stages = ("baseline", "sparse", "finetune-0.5", "finetune-0.7")
    assert {f"runs/{s}/metrics.jsonl" for s in stages} | {"runs/sweep.json", "runs/prune-0.7.json"} <= names
    assert not any(n.startswith("runs/data/") for n in names)
    sweep = json.loads(tar_member(out / "runs.tar.gz", "runs/sweep.json"))
    assert len(sweep["curves"]) == 2  # the sparse model and, for comparison, the baseline
    baseline = [line for line in tar_member(out / "runs.tar.gz", "runs/baseline/config.yaml").splitlines()
                if line.strip().startswith("sparsity:")]
    assert baseline[0].split(":")[1].strip() == "0.0"


@pytest.mark.slow
def test_the_worth_it_plan_compares_fine_tuning_kd_and_scratch(tmp_path):
    out = dry_run(tmp_path, "--plan", "worth-it-vgg", "--no-bench")
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = set(tar.getnames())
    stages = ("sparse", "finetune-0.5", "finetune-kd-0.5", "scratch-e-0.5", "scratch-b-0.5")
    assert {f"runs/{s}/metrics.jsonl" for s in stages} <= names
    summary = (out / "summary.md").read_text()
    assert all(f"- {s}:" in summary for s in stages)
