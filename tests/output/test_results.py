"""The results collector on fabricated run folders (no training)."""

import subprocess
import sys

import pytest

from conftest import DEMO_CONFIG, ROOT, TINY, run, sets
from slimctl import make_checkpoint, save_checkpoint
from slimctl.errors import SlimctlError
from slimctl.models import create_model
from slimctl.output.results import markdown_table


def _ckpt(path, stage, **metrics):
    model = create_model("vgg11", 10, width=0.125)
    save_checkpoint(path, make_checkpoint(model, stage=stage, metrics=metrics))


@pytest.fixture
def runs(tmp_path):
    recipe = tmp_path / "cifar10-vgg19"
    _ckpt(recipe / "baseline" / "best.pt", "sparse-train", top1=93.66, best_top1=93.66, params=20_035_018, flops=797_304_842)
    _ckpt(recipe / "sparse" / "best.pt", "sparse-train", top1=93.3, best_top1=93.3, params=20_035_018, flops=797_304_842)
    _ckpt(recipe / "pruned-0.7.pt", "prune", top1=32.54, params=2_300_000, flops=391_000_000)
    _ckpt(recipe / "finetune-0.7" / "best.pt", "finetune", top1=93.5, best_top1=93.8, params=2_300_000, flops=391_000_000)
    other = tmp_path / "cifar10-resnet164"
    _ckpt(other / "sparse" / "best.pt", "sparse-train", top1=94.0, best_top1=94.0, params=1_703_258, flops=504_759_306)
    _ckpt(other / "pruned-0.4.pt", "prune", top1=80.0, params=1_400_000, flops=380_000_000)
    return tmp_path


def test_table_shows_measured_figures_and_marks_the_rest(runs):
    table = markdown_table(runs)
    lines = table.splitlines()
    vgg = next(l for l in lines if l.startswith("| vgg19 (70% pruned)"))
    assert "| 6.20 |" in vgg  # 100 − best top-1 93.8
    assert "| 67.46 |" in vgg  # error right after pruning: 100 − 32.54
    assert "88.5%" in vgg and "51.0%" in vgg  # params and FLOPs pruned against the baseline
    assert "6.20 / 2.30M / 3.91e+08" in vgg  # the paper's row beside it
    baseline = next(l for l in lines if l.startswith("| vgg19 (baseline)"))
    assert "| 6.34 |" in baseline and "20.04M" in baseline
    resnet = next(l for l in lines if l.startswith("| resnet164 (40% pruned)"))
    assert "not yet run" in resnet  # pruned but not fine-tuned: no invented error
    assert "| 20.00 |" in resnet
    assert "not yet run" in next(l for l in lines if l.startswith("| resnet164 (baseline)"))


def test_scratch_and_distilled_rows_sit_beside_the_fine_tuned_one(runs):
    recipe = runs / "cifar10-vgg19"
    _ckpt(recipe / "finetune-kd-0.7" / "best.pt", "finetune", top1=94.0, best_top1=94.1, params=2_300_000, flops=391_000_000)
    _ckpt(recipe / "scratch-e-0.7" / "best.pt", "scratch", top1=93.0, best_top1=93.2, params=2_300_000, flops=391_000_000)
    lines = markdown_table(runs).splitlines()
    labels = [line.split("|")[1].strip() for line in lines if line.startswith("| vgg19 (70% pruned")]
    assert labels == ["vgg19 (70% pruned)", "vgg19 (70% pruned, fine-tuned + KD)", "vgg19 (70% pruned, scratch-E)"]
    kd = next(l for l in lines if "fine-tuned + KD" in l)
    assert "| 5.90 |" in kd and "88.5%" in kd  # 100 − 94.1, and params pruned against the baseline
    assert not any("scratch-B" in l for l in lines)  # not run: no row


def test_script_and_errors(runs, tmp_path):
    out = tmp_path / "table.md"
    done = subprocess.run([sys.executable, ROOT / "scripts" / "collect_results.py", runs, "-o", out],
                          capture_output=True, text=True)
    assert done.returncode == 0 and out.read_text().startswith("### CIFAR10")
    with pytest.raises(SlimctlError, match="no recipe folders"):
        markdown_table(tmp_path / "cifar10-vgg19" / "baseline")
    bad = subprocess.run([sys.executable, ROOT / "scripts" / "collect_results.py", tmp_path / "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not a folder of runs" in bad.stderr and "Traceback" not in bad.stderr


def test_plots_from_a_tiny_recipe(tmp_path):
    folder = tmp_path / "cifar10-tiny"
    for stage, extra in (("baseline", ["train.sparsity=0"]), ("sparse", [])):
        run("sparse-train", "-c", DEMO_CONFIG, "-o", folder / stage, *sets(*TINY, *extra))
    done = subprocess.run([sys.executable, ROOT / "scripts" / "plot_runs.py", folder], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name in ("gamma_hist.png", "error_curves.png"):
        data = (folder / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    empty = subprocess.run([sys.executable, ROOT / "scripts" / "plot_runs.py", tmp_path / "nothing"],
                           capture_output=True, text=True)
    assert empty.returncode == 2 and "not a recipe folder" in empty.stderr
