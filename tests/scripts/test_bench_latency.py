"""scripts/bench_latency.py end to end on one small model (Torch-Pruning's columns need its package)."""

import re
import subprocess
import sys

from conftest import ROOT


def test_the_latency_benchmark_prints_one_row_per_variant(tmp_path):
    out = tmp_path / "table.md"
    done = subprocess.run([sys.executable, "scripts/bench_latency.py", "--models", "resnet18", "--size", "32",
                           "--runtimes", "torch", "--batch-sizes", "1", "--rounds", "1", "--repeats", "1",
                           "--no-torch-pruning", "--markdown", out], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={"XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
                                            "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| resnet18")]
    assert [row.split(" | ")[1] for row in rows] == ["slimctl", "auto", "latency", "coupled", "flops"]
    for row in rows:  # a speed-up and the FLOPs removed in each cell
        cell = row.split(" | ")[2].strip(" |")
        if cell == "failed" and " latency " in row:  # a target timing noise made unreachable: said, not hidden
            assert "latency torch bs 1: failed (SlimctlError: --target-latency" in done.stderr
            continue
        assert re.fullmatch(r"\d+\.\d\d× \(\d+%.*\)", cell), row
    assert "slimctl's default below 1.00× in" in out.read_text() and "--target-latency within ±10%" in out.read_text()
