"""The paper-style results table, built from finished run folders (`make table`).

A recipe's folder (`RUNS/<dataset>-<name>/`, as the Makefile lays it out) holds `baseline/`,
`sparse/`, `pruned-<ratio>.pt` and `finetune-<ratio>/`. Figures come from the checkpoints' recorded
metrics; a stage that has not run shows "not yet run", never a number.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimctl.io.checkpoint import load_checkpoint
from slimctl.errors import SlimctlError
from slimctl.io.yaml_safe import safe_yaml

# Paper, Table 1(a) (CIFAR-10): test error %, params, FLOPs; ratio None = the unpruned baseline.
PAPER = {
    ("cifar10", "vgg19", None): (6.34, 20.04e6, 7.97e8),
    ("cifar10", "vgg19", 0.7): (6.20, 2.30e6, 3.91e8),
    ("cifar10", "densenet40", None): (6.11, 1.02e6, 5.33e8),
    ("cifar10", "densenet40", 0.4): (5.19, 0.66e6, 3.81e8),
    ("cifar10", "densenet40", 0.7): (5.65, 0.35e6, 2.40e8),
    ("cifar10", "resnet164", None): (5.42, 1.70e6, 4.99e8),
    ("cifar10", "resnet164", 0.4): (5.08, 1.44e6, 3.81e8),
    ("cifar10", "resnet164", 0.6): (5.27, 1.10e6, 2.75e8),
}

NOT_RUN = "not yet run"


@dataclass(frozen=True)
class Row:
    model: str
    error: float | None  # test error %, best epoch
    params: int | None
    flops: int | None
    error_after_prune: float | None = None
    paper: tuple[float, float, float] | None = None


def _metrics(path: Path) -> dict[str, Any] | None:
    """A checkpoint's recorded metrics, or None when the file is absent."""
    if not path.exists():
        return None
    metrics = load_checkpoint(path).get("metrics")  # the same checks as every other reader
    return metrics if isinstance(metrics, dict) else {}


def _error(metrics: dict[str, Any] | None, key: str = "best_top1") -> float | None:
    if not metrics:
        return None
    top1 = metrics.get(key, metrics.get("top1"))
    return None if top1 is None else 100.0 - float(top1)


# The pruned architecture trained other ways (run folder prefix, row label): distilled, or from
# scratch (Liu et al., ICLR 2019); the Makefile's -distill / -scratch-e / -scratch-b targets.
OTHER_TRAININGS = (("finetune-kd", "fine-tuned + KD"), ("scratch-e", "scratch-E"), ("scratch-b", "scratch-B"))


def recipe_rows(folder: Path) -> list[Row]:
    """Rows for one recipe folder: baseline, sparse, then one per pruning ratio found."""
    dataset, _, name = folder.name.partition("-")
    rows = []
    for stage, label in (("baseline", "baseline"), ("sparse", "sparse-trained")):
        m = _metrics(folder / stage / "best.pt")
        paper = PAPER.get((dataset, name, None)) if stage == "baseline" else None
        rows.append(Row(f"{name} ({label})", _error(m), m and m.get("params"), m and m.get("flops"), paper=paper))
    runs = "|".join(["pruned", "finetune", *(run for run, _ in OTHER_TRAININGS)])
    ratios = sorted(
        {float(match.group(1)) for p in folder.iterdir() if (match := re.fullmatch(rf"(?:{runs})-([0-9.]+)(?:\.pt)?", p.name))}
    )
    for ratio in ratios:
        pruned = _metrics(folder / f"pruned-{ratio:g}.pt")
        tuned = _metrics(folder / f"finetune-{ratio:g}" / "best.pt")
        source = tuned or pruned or {}
        rows.append(
            Row(
                f"{name} ({ratio:.0%} pruned)",
                _error(tuned),
                source.get("params"),
                source.get("flops"),
                error_after_prune=_error(pruned, key="top1"),
                paper=PAPER.get((dataset, name, ratio)),
            )
        )
        for run, label in OTHER_TRAININGS:
            m = _metrics(folder / f"{run}-{ratio:g}" / "best.pt")
            if m is not None:
                rows.append(Row(f"{name} ({ratio:.0%} pruned, {label})", _error(m), m.get("params"), m.get("flops")))
    return rows


def _fmt_count(n: float | None, unit: float, suffix: str) -> str:
    return NOT_RUN if n is None else f"{n / unit:.2f}{suffix}"


def _fmt_pruned(n: float | None, base: float | None) -> str:
    if n is None or not base:
        return "-"
    return f"{100 * (1 - n / base):.1f}%"


def markdown_table(runs_dir: Path) -> str:
    """One Markdown table per data set: measured figures next to the paper's."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise SlimctlError(f"{runs_dir} is not a folder of runs (expected RUNS/<dataset>-<arch>/...)")
    folders = sorted(p for p in runs_dir.iterdir() if p.is_dir() and "-" in p.name and p.name.split("-")[0].startswith("cifar"))
    if not folders:
        raise SlimctlError(f"no recipe folders (like cifar10-vgg19/) in {runs_dir}")
    lines = []
    for dataset in sorted({f.name.split("-")[0] for f in folders}):
        lines += [
            f"### {dataset.upper()}",
            "",
            "| model | test error % | error right after pruning % | params | params pruned | FLOPs | FLOPs pruned | paper: error % / params / FLOPs |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for folder in (f for f in folders if f.name.split("-")[0] == dataset):
            rows = recipe_rows(folder)
            base = next((r for r in rows if r.params is not None), None)
            for row in rows:
                error = NOT_RUN if row.error is None else f"{row.error:.2f}"
                after = "-" if row.error_after_prune is None else f"{row.error_after_prune:.2f}"
                paper = "-" if row.paper is None else f"{row.paper[0]:.2f} / {row.paper[1] / 1e6:.2f}M / {row.paper[2]:.2e}"
                reference = base if "% pruned" in row.model else None  # % pruned only on pruned rows
                lines.append(
                    f"| {row.model} | {error} | {after} | {_fmt_count(row.params, 1e6, 'M')} | "
                    f"{_fmt_pruned(row.params, reference and reference.params)} | {_fmt_count(row.flops, 1e6, 'M')} | "
                    f"{_fmt_pruned(row.flops, reference and reference.flops)} | {paper} |"
                )
        lines.append("")
    return "\n".join(lines)


RUN_KEYS = ("epoch", "test_top1", "images_per_sec", "gamma_mean_abs", "gamma_frac_below_1e-2")  # what compare shows


def read_run(folder: Path) -> dict[str, Any]:
    """A run folder's metrics.jsonl rows, stage and recorded environment (for `slimctl compare`);
    anything else is a one-line SlimctlError naming the file and line."""
    import yaml

    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise SlimctlError(f"{folder} is not a run folder (no metrics.jsonl): give sparse-train or finetune -o folders")
    rows = []
    for number, line in enumerate(metrics.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SlimctlError(f"{metrics} line {number} is not valid JSON ({exc.msg})") from None
        missing = [k for k in RUN_KEYS if not (isinstance(row, dict) and isinstance(row.get(k), (int, float))
                                                and not isinstance(row.get(k), bool))]
        if missing:
            raise SlimctlError(f"{metrics} line {number} lacks a number for {', '.join(missing)}: not a slimctl "
                               "metrics row")
        rows.append(row)
    if not rows:
        raise SlimctlError(f"{metrics} holds no finished epoch yet")
    config = {}
    if (folder / "config.yaml").is_file():
        try:
            loaded = safe_yaml((folder / "config.yaml").read_text(errors="replace"), str(folder / "config.yaml"))
        except yaml.YAMLError as exc:
            first = (str(exc).strip().splitlines() or ["invalid"])[0][:120]
            raise SlimctlError(f"{folder / 'config.yaml'} is not a run's config ({first})") from None
        config = loaded if isinstance(loaded, dict) else {}
    stage, env = config.get("stage", "?"), config.get("environment")
    config = {"stage": stage if isinstance(stage, str) else "?", "environment": env if isinstance(env, dict) else None}
    return {"label": folder.name, "path": str(folder), "stage": config.get("stage", "?"), "rows": rows,
            "environment": config.get("environment")}
