"""One prepared GPU run: environment, training throughput, and the paper's VGG-19 row as far as it fits.

    OUT=gpu_out bash scripts/gpu_check.sh                 # on the GPU machine (≤ --budget seconds)
    OUT=/tmp/x bash scripts/gpu_check.sh --dry-run        # the same steps on the CPU in ~1 min

Phases, each under its own time limit so the whole stays inside the GPU time budget:
  1. environment → env.txt (GPU, driver, torch build, CPU, threads)
  2. data: CIFAR-10 built from the JPEG copy carried in `local/` (`--dry-run`: random images)
  3. bench_train.py: reference loop vs slimctl eager / channels_last / compiled, VGG-19 first,
     then ResNet-164 and DenseNet-40 → bench.md, bench.json
  4. the paper's VGG-19 recipe (configs/cifar10_vgg19.yaml: SGD 0.1, batch 64, milestones at 50% and
     75%) compressed to the epochs the remaining time allows, with the paper's L1 budget (λ 1e-4
     over 160 epochs ≈ 0.66, so λ is derived for the shorter schedule): sparse-train → sweep →
     prune 0.7 → finetune → report --json. Eager or compiled, whichever the bench measured faster
     once its compile time is paid.
     Or, with `--plan cpu-repro-vgg`, `make cpu-repro-vgg`: VGG-19 ×0.25, baseline and sparse side
     by side, sweep against the baseline, prunes at 0.5 and 0.7, both fine-tunes side by side.
     Or, with `--plan worth-it-vgg`: that recipe's 50% model fine-tuned, fine-tuned + KD, Scratch-E
     and Scratch-B side by side (issue 17's comparison).
  5. runs.tar.gz (metrics, configs, sweeps, figures, reports; no checkpoints) and summary.md
Everything lands in OUT (≤ 8 files, none in subfolders: what the device tool brings back).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click

from slimctl import environment as run_environment

ROOT = Path(__file__).resolve().parent.parent
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
PAPER_L1_BUDGET = 0.66  # λ 1e-4 × Σlr of the paper's 160-epoch VGG schedule (slimctl.core.sparsity)
SECONDS_PER_EPOCH_EXTRA = 1.5  # checkpoint writes (last.pt + best.pt) and the epoch's bookkeeping
STAGE_START_SECONDS = 20  # process start, data to the device, model build
W025 = "configs/cifar10_vgg19_w025.yaml"  # the CPU-repro recipe: VGG-19 ×0.25, 30 epochs, budget 0.66
SLIM = [sys.executable, "-m", "slimctl"]


@dataclass
class Clock:
    """The GPU time budget: every phase asks how much is left before it starts."""

    budget: float
    start: float = 0.0

    def __post_init__(self) -> None:
        self.start = time.monotonic()

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)


class Log:
    """Prints and appends to OUT/log.txt (the device tool returns only the output's tail)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        with self.path.open("a") as f:
            f.write(text + "\n")


def run_many(cmds: list[list[str]], log: Log, *, timeout: float) -> list[tuple[int, str]]:
    """Run commands side by side under one time limit; each one's (exit code, output), logged.

    Side by side because these trainings are bound by kernel launches: one GPU runs two of them
    almost as fast as one. At the limit each gets SIGTERM first (slimctl stops at a step with a
    resumable last.pt); 124 means the limit was reached. Each runs in its own process group, so
    the limit also stops its children (bench workers hold the GPU).
    """
    deadline = time.monotonic() + max(1.0, timeout)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    started = []
    for cmd in cmds:
        log(f"$ {' '.join(cmd)}   (limit {timeout:.0f} s)")
        sink = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would stall a run
        started.append((subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                         start_new_session=True, env=env), sink))
    results = []
    for proc, sink in started:
        code = _wait(proc, deadline)
        sink.seek(0)
        output = sink.read()
        sink.close()
        with log.path.open("a") as f:
            f.write(output)
        print("\n".join(output.strip().splitlines()[-3:]), flush=True)
        results.append((code, output))
    return results


def _wait(proc: subprocess.Popen, deadline: float) -> int:
    try:
        return proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return 124


def run(cmd: list[str], log: Log, *, timeout: float) -> tuple[int, str]:
    """One command under a time limit (see run_many)."""
    return run_many([cmd], log, timeout=timeout)[0]


# --------------------------------------------------------------------------- phases


def environment(out: Path, log: Log) -> str:
    """env.txt: what the figures were measured on. Returns the accelerator's name."""
    import torch

    lines = [f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", f"python: {sys.version.split()[0]}",
             f"torch: {torch.__version__} (CUDA {torch.version.cuda})", f"platform: {platform.platform()}",
             f"cpu cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}"]
    env = run_environment(torch.device("cpu"), None)
    model, flags = env["cpu"], env["cpu_flags"]
    lines.append(f"cpu: {model} ({', '.join(flags) or 'no avx2'})")
    name = "cpu"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        name = names[0]
        props = torch.cuda.get_device_properties(0)
        lines.append(f"gpus: {', '.join(names)}; {props.multi_processor_count} SMs, "
                     f"{props.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True)
            lines.append(f"nvidia-smi: {smi.stdout.strip()}")
    (out / "env.txt").write_text("\n".join(lines) + "\n")
    for line in lines:
        log(line)
    return name


def prepare_data(data_root: Path, *, dry_run: bool, log: Log) -> None:
    """CIFAR-10 in its python layout under data_root (random images for a dry run)."""
    if (data_root / "cifar-10-batches-py" / "test_batch").exists():
        log(f"data: {data_root}/cifar-10-batches-py already there")
        return
    if dry_run:
        sys.path.insert(0, str(ROOT / "scripts"))
        from bench_train import write_fake_cifar

        write_fake_cifar(data_root, n=64)
        log(f"data: random images in the CIFAR-10 layout under {data_root} (dry run)")
        return
    maker = ROOT / "local" / "make_cifar10.py"  # beside cifar10-jpeg.tar.gz, carried with the tree
    if not maker.exists():
        raise click.ClickException("local/make_cifar10.py and local/cifar10-jpeg.tar.gz are missing: copy them "
                                   "from ../shared/data into the checkout's git-ignored local/ and carry it")
    started = time.monotonic()
    subprocess.run([sys.executable, str(maker), str(data_root)], check=True)
    log(f"data: CIFAR-10 (shared JPEG copy) built in {time.monotonic() - started:.0f} s")


def run_bench(out: Path, log: Log, *, data_root: Path, models: str, variants: str, device: str, dry_run: bool,
          timeout: float, json_name: str) -> list[dict]:
    """bench_train.py over `models` × `variants`; its table is appended to bench.md."""
    if dry_run:
        shape = ["--width", "0.0625", "--steps", "2", "--warmup", "1", "--timeout", "120"]
    else:
        shape = ["--steps", "100", "--warmup", "10", "--timeout", "100"]
    cmd = [sys.executable, "scripts/bench_train.py", "--data", str(data_root), "--device", device,
           "--models", models, "--variants", variants, "--json-out", str(out / json_name), *shape]
    code, output = run(cmd, log, timeout=timeout)
    table = output[output.find("| model |"):] if "| model |" in output else f"(bench ended with code {code})\n"
    with (out / "bench.md").open("a") as f:
        f.write(table + "\n")
    path = out / json_name
    return json.loads(path.read_text())["rows"] if path.exists() else []


def training_plan(rows: list[dict], seconds: float) -> tuple[bool, bool, int]:
    """(compile?, channels_last?, epochs per stage) for VGG-19 in `seconds`, from the bench's images/s."""
    measured = {r["variant"]: r for r in rows if r.get("arch") == "vgg19" and "images_per_sec" in r}
    eager = max([(measured[v]["images_per_sec"], v) for v in ("slimctl", "slimctl-cl") if v in measured],
                default=(1000.0, "slimctl-cl"))

    def epochs(ips: float, overhead: float) -> int:
        epoch = (CIFAR_TRAIN + CIFAR_TEST / 3) / ips + SECONDS_PER_EPOCH_EXTRA
        return max(1, int((seconds / 2 - STAGE_START_SECONDS - overhead) / epoch))

    plain = epochs(eager[0], 0.0)
    compiled = measured.get("slimctl-compiled")
    if compiled:
        # Each stage compiles once more (the pruned network is another graph).
        fast = epochs(compiled["images_per_sec"], compiled["compile_seconds"])
        if fast > plain:
            return True, True, fast  # the bench compiles in channels_last
    return False, eager[1] == "slimctl-cl", plain


def vgg19_row(runs: Path, log: Log, *, data_root: Path, clock: Clock, rows: list[dict], dry_run: bool,
              device: str) -> None:
    """The paper's VGG-19 recipe, compressed to the epochs that fit; results into runs/."""
    reserve = 45.0  # sweep, prune, report and packing
    use_compile, channels_last, epochs = training_plan(rows, clock.left() - reserve)
    shape = []
    if dry_run:
        use_compile, epochs = False, 1
        shape = ["model.width=0.0625", "data.subset=128", "train.device=cpu"]
    recipe = [f"data.root={data_root}", "data.download=false", f"train.epochs={epochs}",
              f"finetune.epochs={epochs}", "train.sparsity=0", f"train.sparsity_budget={PAPER_L1_BUDGET}",
              f"train.channels_last={str(channels_last).lower()}", f"train.compile={'reduce-overhead' if use_compile else 'false'}", *shape]
    sets = [arg for item in recipe for arg in ("--set", item)]
    log(f"vgg19: {epochs} + {epochs} epochs, {'compiled (reduce-overhead)' if use_compile else 'eager'}, "
        f"{clock.left():.0f} s left")
    stage_time = (clock.left() - reserve) / 2
    run([*SLIM, "sparse-train", "-c", "configs/cifar10_vgg19.yaml", "-o", str(runs / "sparse"), "--force", *sets],
        log, timeout=stage_time)
    sparse = runs / "sparse" / "best.pt"
    if not sparse.exists():
        log("vgg19: no sparse checkpoint; stopping here")
        return
    evaluate_on = ["--device", device]
    for name, cmd in (
        ("sweep", ["sweep", str(sparse), "--ratios", "0.3,0.5,0.6,0.7,0.8", "--png", str(runs / "sweep.png")]),
        ("prune", ["prune", str(sparse), "--ratio", "0.7", "-o", str(runs / "pruned-0.7.pt"), "--force"]),
    ):
        code, output = run([*SLIM, *cmd, "--json", *evaluate_on], log, timeout=min(60, clock.left()))
        if code == 0:
            (runs / f"{name}.json").write_text(output[output.find("{"):])
    pruned = runs / "pruned-0.7.pt"
    if not pruned.exists():
        return
    run([*SLIM, "finetune", str(pruned), "-c", "configs/cifar10_vgg19.yaml", "-o", str(runs / "finetune"),
         "--force", *sets], log, timeout=max(30.0, clock.left() - 25))
    write_report(runs / "finetune" / "best.pt", runs, log)


def w025_sets(data_root: Path, *, dry_run: bool):
    """`--set` arguments for the CPU-repro recipe's runs, plus `extra` ones (tiny on a dry run,
    compiled on a GPU)."""
    common = [f"data.root={data_root}", "data.download=false"]
    common += ["model.width=0.0625", "data.subset=128", "train.device=cpu", "train.epochs=1", "finetune.epochs=1"] \
        if dry_run else ["train.compile=reduce-overhead"]
    return lambda *extra: [arg for item in (*common, *extra) for arg in ("--set", item)]


def write_report(best: Path, runs: Path, log: Log) -> None:
    """runs/report.json: `slimctl report --json` of the last stage, when it finished an epoch."""
    if best.exists():
        code, output = run([*SLIM, "report", str(best), "--json"], log, timeout=60)
        if code == 0:
            (runs / "report.json").write_text(output[output.find("["):])


def cpu_repro_vgg(runs: Path, log: Log, *, data_root: Path, clock: Clock, dry_run: bool, device: str) -> None:
    """`make cpu-repro-vgg` on the GPU: VGG-19 ×0.25 (configs/cifar10_vgg19_w025.yaml: 30 epochs,
    L1 budget 0.66; fine-tunes 20), the baseline (λ = 0) and the sparse run side by side, then the
    sweep of the sparse model against the baseline, prunes at 0.5 and 0.7, and both fine-tunes side
    by side. Compiled (reduce-overhead) on a GPU: the small network is launch-bound."""
    sets = w025_sets(data_root, dry_run=dry_run)
    reserve = 40.0  # sweep, prunes, report and packing (seconds)
    log(f"cpu-repro-vgg: baseline and sparse side by side, {clock.left():.0f} s left")
    run_many([[*SLIM, "sparse-train", "-c", W025, "-o", str(runs / "baseline"), "--force",
               *sets("train.sparsity=0", "train.sparsity_budget=null")],
              [*SLIM, "sparse-train", "-c", W025, "-o", str(runs / "sparse"), "--force", *sets()]],
             log, timeout=(clock.left() - reserve) * 0.6)
    sparse, baseline = runs / "sparse" / "best.pt", runs / "baseline" / "best.pt"
    if not sparse.exists():
        log("cpu-repro-vgg: no sparse checkpoint; stopping here")
        return
    evaluate_on = ["--device", device]
    compare = ["--compare", str(baseline)] if baseline.exists() else []
    code, output = run([*SLIM, "sweep", str(sparse), *compare, "--ratios", "0.3,0.4,0.5,0.6,0.7",
                        "--png", str(runs / "sweep.png"), "--json", *evaluate_on], log, timeout=min(60, clock.left()))
    if code == 0:
        (runs / "sweep.json").write_text(output[output.find("{"):])
    tunes = []
    for ratio in ("0.5", "0.7"):
        pruned = runs / f"pruned-{ratio}.pt"
        code, output = run([*SLIM, "prune", str(sparse), "--ratio", ratio, "-o", str(pruned), "--force", "--json",
                            *evaluate_on], log, timeout=min(60, clock.left()))
        if code == 0:
            (runs / f"prune-{ratio}.json").write_text(output[output.find("{"):])
            tunes.append([*SLIM, "finetune", str(pruned), "-c", W025, "-o", str(runs / f"finetune-{ratio}"),
                          "--force", *sets()])
    run_many(tunes, log, timeout=max(30.0, clock.left() - 25))
    write_report(runs / "finetune-0.7" / "best.pt", runs, log)


def worth_it_vgg(runs: Path, log: Log, *, data_root: Path, clock: Clock, dry_run: bool, device: str) -> None:
    """Is the slimmed model worth it (issue 17), at the CPU-repro scale: VGG-19 ×0.25 sparse-trained
    (30 epochs, budget 0.66), pruned 50%, then side by side: fine-tuned, fine-tuned + KD (α 0.5),
    Scratch-E and Scratch-B. A run the budget's end stops keeps its best epoch so far (its
    metrics.jsonl says how many epochs it had)."""
    sets = w025_sets(data_root, dry_run=dry_run)
    run([*SLIM, "sparse-train", "-c", W025, "-o", str(runs / "sparse"), "--force", *sets()], log,
        timeout=(clock.left() - 60) * 0.35)
    sparse, pruned = runs / "sparse" / "best.pt", runs / "pruned-0.5.pt"
    if not sparse.exists():
        log("worth-it-vgg: no sparse checkpoint; stopping here")
        return
    code, output = run([*SLIM, "prune", str(sparse), "--ratio", "0.5", "-o", str(pruned), "--force", "--json",
                        "--device", device], log, timeout=min(60, clock.left()))
    if code != 0:
        return
    (runs / "prune-0.5.json").write_text(output[output.find("{"):])
    run_many([
        [*SLIM, "finetune", str(pruned), "-c", W025, "-o", str(runs / "finetune-0.5"), "--force", *sets()],
        [*SLIM, "finetune", str(pruned), "-c", W025, "-o", str(runs / "finetune-kd-0.5"), "--force",
         *sets("finetune.distill.alpha=0.5")],
        [*SLIM, "scratch", str(pruned), "-c", W025, "-o", str(runs / "scratch-e-0.5"), "--force", *sets()],
        [*SLIM, "scratch", str(pruned), "-c", W025, "-o", str(runs / "scratch-b-0.5"), "--force",
         "--budget", "flops", *sets()],
    ], log, timeout=max(30.0, clock.left() - 25))


PLANS = ("paper-vgg19", "cpu-repro-vgg", "worth-it-vgg")


def pack(out: Path, runs: Path, log: Log) -> None:
    """runs.tar.gz: every run's small files (no checkpoints: they would not come back anyway)."""
    with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:
        for path in sorted(runs.rglob("*")):
            if path.is_file() and path.suffix != ".pt" and path.relative_to(runs).parts[0] != "data":
                tar.add(path, arcname=str(Path("runs") / path.relative_to(runs)))
    log(f"packed {out / 'runs.tar.gz'}")


def summary(out: Path, runs: Path, device_name: str) -> None:
    """summary.md: the bench table and the VGG-19 stages, for the README."""
    parts = [f"# GPU check on {device_name}\n", (out / "env.txt").read_text()]
    if (out / "bench.md").exists():
        parts += ["\n## Training throughput\n", (out / "bench.md").read_text()]
    parts.append("\n## Runs\n")
    for metrics in sorted(runs.glob("*/metrics.jsonl")):
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if rows:
            last, best = rows[-1], max(r["test_top1"] for r in rows)
            parts.append(f"- {metrics.parent.name}: {len(rows)} epochs, best top-1 {best:.2f}%, "
                         f"last {last['test_top1']:.2f}%, {last['images_per_sec']:.0f} img/s, "
                         f"|γ|<1e-2: {last.get('gamma_frac_below_1e-2', 0):.0%}\n")
    if (runs / "report.json").exists():
        parts.append("\n```json\n" + (runs / "report.json").read_text() + "\n```\n")
    (out / "summary.md").write_text("".join(parts))


def ddp_smoke(runs: Path, log: Log, *, data_root: Path) -> None:
    """Two processes, NCCL, one short epoch: only where the machine has two GPUs or more."""
    import torch

    if torch.cuda.device_count() < 2:
        log("ddp: one GPU, no torchrun smoke")
        return
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "slimctl", "sparse-train",
         "-c", "configs/cifar10_vgg19.yaml", "-o", str(runs / "ddp"), "--force", "--set", f"data.root={data_root}",
         "--set", "train.epochs=1", "--set", "data.subset=4096"], log, timeout=120)


# --------------------------------------------------------------------------- main


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("gpu_out"), show_default=True)
@click.option("--runs", type=click.Path(path_type=Path), default=ROOT / "local" / "gpu_runs", show_default=True,
              help="Working folder for data and run folders (replaced).")
@click.option("--budget", type=float, default=570, show_default=True, help="Seconds for everything.")
@click.option("--dry-run", is_flag=True, help="Tiny model, random data, 1 epoch, on the CPU.")
@click.option("--plan", type=click.Choice(PLANS), default="paper-vgg19", show_default=True,
              help="paper-vgg19: the paper's VGG-19 recipe compressed to what fits; cpu-repro-vgg: "
                   "`make cpu-repro-vgg` (VGG-19 ×0.25, baseline and sparse, 30 + 20 epochs); worth-it-vgg: "
                   "its 50% model fine-tuned, fine-tuned + KD, Scratch-E and Scratch-B side by side.")
@click.option("--bench/--no-bench", default=True, show_default=True, help="Run the throughput bench first.")
def main(out: Path, runs: Path, budget: float, dry_run: bool, plan: str, bench: bool) -> None:
    clock = Clock(budget)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "log.txt")
    runs = runs.resolve()
    if runs.exists():
        shutil.rmtree(runs)
    runs.mkdir(parents=True)
    data_root = runs / "data" if dry_run else ROOT / "local" / "data"
    device_name = environment(out, log)
    device = "cpu" if dry_run or device_name == "cpu" else "cuda"
    prepare_data(data_root, dry_run=dry_run, log=log)
    rows = []
    if bench:
        first = "vgg19" if not dry_run else "vgg11"
        core = "reference,slimctl,slimctl-cl" + (",slimctl-compiled" if device == "cuda" else "")
        rows = run_bench(out, log, data_root=data_root, models=first, variants=core, device=device, dry_run=dry_run,
                         timeout=min(200, clock.left() * 0.3), json_name="bench_vgg19.json")
        if not dry_run:  # the same script again, other models: a dry run checks it once
            rows += run_bench(out, log, data_root=data_root, models="resnet164,densenet40",
                              variants="reference,slimctl-cl", device=device, dry_run=dry_run,
                              timeout=min(90, clock.left() * 0.2), json_name="bench_more.json")
    try:
        if device == "cuda":
            ddp_smoke(runs, log, data_root=data_root)
        if plan == "paper-vgg19":
            vgg19_row(runs, log, data_root=data_root, clock=clock, rows=rows, dry_run=dry_run, device=device)
        else:
            recipe = cpu_repro_vgg if plan == "cpu-repro-vgg" else worth_it_vgg
            recipe(runs, log, data_root=data_root, clock=clock, dry_run=dry_run, device=device)
    finally:
        pack(out, runs, log)
        summary(out, runs, device_name)
    log(f"done, {clock.left():.0f} s of the budget left")


if __name__ == "__main__":
    main()
