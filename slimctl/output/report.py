"""What users read: rich tables, the |γ| histogram (PNG), JSON-able summaries."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from slimctl.base.device import machine_label
from slimctl.base.files import atomic_write_bytes


def human(n: float) -> str:
    """1234567 → '1.23M' (params and FLOPs in tables)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


def plot_gamma_histogram(scores: torch.Tensor, threshold: float | None, path: Path, title: str) -> None:
    """Histogram of all ranked |γ| on a log axis, with the pruning threshold marked."""
    plt = _pyplot()
    values = scores.float().clamp_min(1e-8)  # a log axis cannot show exact zeros
    low, high = float(torch.log10(values.min())), float(torch.log10(values.max()))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values.numpy(), bins=torch.logspace(low - 0.1, high + 0.1, 80).numpy(), color="#4477aa")
    ax.set_xscale("log")
    ax.set_xlabel("|γ| (BN scale; values below 1e-8 drawn at 1e-8)")
    ax.set_ylabel("channels")
    ax.set_title(title)
    if threshold is not None:
        ax.axvline(max(threshold, 1e-8), color="#cc3311", linestyle="--", label=f"threshold {threshold:.3g}")
        ax.legend()
    fig.tight_layout()
    _save_png(fig, path)


def prune_table(result: dict[str, Any]) -> Table:
    threshold = "none (ratio 0)" if result["threshold"] is None else f"{result['threshold']:.4g}"
    table = Table(title=f"prune ratio {result['ratio']:g}, |γ| threshold {threshold}")
    table.add_column("BN layer")
    table.add_column("kept", justify="right")
    table.add_column("total", justify="right")
    table.add_column("kept %", justify="right")
    for layer in result["layers"]:
        table.add_row(layer["name"], str(layer["kept"]), str(layer["total"]), f"{100 * layer['kept'] / layer['total']:.0f}%")
    return table


def before_after_table(result: dict[str, Any]) -> Table:
    table = Table(title="before → after")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("removed", justify="right")
    for key, label in (("params", "params"), ("flops", "FLOPs")):
        before, after = result[f"{key}_before"], result[key]
        table.add_row(label, human(before), human(after), f"{100 * (1 - after / before):.1f}%")
    if result.get("top1_before") is not None or result.get("top1") is not None:
        table.add_row("test top-1", percent(result.get("top1_before")), percent(result.get("top1")), "")
    return table


def lineage_table(rows: list[dict[str, Any]]) -> Table:
    """One row per stage of a checkpoint's history (sparse-train → prune → finetune …)."""
    table = Table(title="slimming summary")
    for column in ("stage", "checkpoint", "params", "FLOPs", "test top-1", "trained on"):
        table.add_column(column, justify="right" if column in ("params", "FLOPs", "test top-1") else "left")
    for row in rows:
        table.add_row(row["stage"], os.path.relpath(row["path"]), human(row["params"]), human(row["flops"]),
                      percent(row.get("top1")), machine_label(row.get("environment")))
    return table


def artifact_table(path: Path, record: dict[str, Any]) -> Table:
    """What `slimctl export` stored in an artifact: the model, its counts and where it came from."""
    table = Table(title=f"{path} ({record['format']}, slimctl {record.get('slimctl_version')})", show_header=False)
    table.add_column("key")
    table.add_column("value", overflow="fold")
    table.add_row("arch", f"{record.get('arch')} ({record.get('num_classes')} classes), input {record.get('input_size')}")
    table.add_row("params / FLOPs", f"{human(int(record['params']))} / {human(int(record['flops']))}")
    table.add_row("test top-1", percent(record.get("top1")))
    table.add_row("lineage", " → ".join(f"{r['stage']} ({percent(r.get('top1'))})" for r in record.get("lineage") or []))
    table.add_row("checkpoint", str(record.get("checkpoint")))
    return table


def bench_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for column in ("checkpoint", "runtime", "params", "FLOPs", "batch", "latency ms", "images/s", "speed-up"):
        # Numbers whole at any terminal width; a long path wraps instead.
        table.add_column(column, justify="left" if column in ("checkpoint", "runtime") else "right",
                         no_wrap=column != "checkpoint", overflow="fold")
    for r in rows:
        table.add_row(os.path.relpath(r["checkpoint"]), r.get("runtime", "torch"), human(r["params"]),
                      human(r["flops"]), str(r["batch_size"]), f"{r['latency_ms']:.2f}", f"{r['images_per_sec']:.0f}",
                      f"{r['speedup']:.2f}×")
    return table


def groups_table(rows: list[dict[str, Any]], *, explain: bool) -> Table:
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    table = Table(title="channel spaces: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    notes = explain and any(r.get("constant_note") for r in rows)
    columns = ("kind", "width", "ranked by", *(("members", "why it keeps its width") if explain else ()),
               *(("β compensation",) if notes else ()))
    for column in columns:
        table.add_column(column, justify="right" if column == "width" else "left", overflow="fold")
    for r in rows:
        bns = ", ".join(r["bns"]) or "-"
        extra = (", ".join(r["members"]), r["reason"] or "") if explain else ()
        extra += (r.get("constant_note") or "",) if notes else ()
        table.add_row(r["kind"], str(r["width"]), bns, *extra)
    return table


def info_table(info: dict[str, Any]) -> Table:
    table = Table(title=f"{info['arch']} ({info['num_classes']} classes)")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("params", f"{info['params']:,}")
    table.add_row("FLOPs", f"{info['flops']:,}")
    table.add_row("BN widths", " ".join(str(w) for w in info["bn_widths"].values()))
    return table


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    _pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_gamma_comparison(named_scores: dict[str, torch.Tensor], path: Path, title: str) -> None:
    """|γ| histograms of several models on one log axis (the paper's Figure: λ = 0 vs λ > 0)."""
    plt = _pyplot()
    values = {k: v.float().clamp_min(1e-8) for k, v in named_scores.items()}
    low = min(float(torch.log10(v.min())) for v in values.values())
    high = max(float(torch.log10(v.max())) for v in values.values())
    bins = torch.logspace(low - 0.1, high + 0.1, 80).numpy()
    fig, axes = plt.subplots(len(values), 1, figsize=(6, 2.2 * len(values)), sharex=True, squeeze=False)
    for ax, (name, v) in zip(axes[:, 0], values.items()):
        ax.hist(v.numpy(), bins=bins, color="#4477aa")
        ax.set_xscale("log")
        ax.set_ylabel("channels")
        ax.set_title(f"{name}: {100 * float((v < 1e-2).float().mean()):.1f}% of |γ| < 1e-2", fontsize=9)
    axes[-1, 0].set_xlabel("|γ| (BN scale, log scale)")
    fig.suptitle(title)
    fig.tight_layout()
    _save_png(fig, path)


def plot_sweep(curves: dict[str, dict[str, Any]], path: Path, *, modes: tuple[str, ...], title: str) -> None:
    """Top-1 right after pruning vs ratio: one line per model and compensation mode, the unpruned
    top-1 of each model dashed (the paper's "sparsity makes pruning safe" picture)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colours = ["#4477aa", "#cc6677", "#228833", "#aa3377"]
    for colour, (name, curve) in zip(colours, curves.items()):
        label = Path(name).parent.name or Path(name).name
        ratios = [r["ratio"] for r in curve["rows"]]
        for mode, style in zip(modes, ("-o", ":x", "--s")):
            ax.plot(ratios, [r[f"top1_{mode}"] for r in curve["rows"]], style, color=colour,
                    label=f"{label}, {mode.replace('_recal', ' + BN recalibration')}")
        ax.axhline(curve["top1_unpruned"], color=colour, linestyle="--", linewidth=0.8)
    ax.set_xlabel("ratio of BN channels removed")
    ax.set_ylabel("test top-1 % (before fine-tuning)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)


def sweep_table(result: dict[str, Any]) -> Table:
    modes = [result["compensate"]] + (["none"] if result["compensate"] != "none" else [])
    recal = ""
    if result.get("recalibrated_images"):
        modes.append(f"{result['compensate']}_recal")
        recal = f"; _recal: BN statistics re-estimated on {result['recalibrated_images']} training images"
    table = Table(title=f"top-1 right after pruning, compensate={result['compensate']} "
                        f"({result['images']} test images{recal})")
    # how far each pruned model is from what its mode promises (slimctl.core.exactness), for the modes swept
    checked = list(dict.fromkeys((result["compensate"], "none")))
    timed = result.get("latency") is not None  # sweep --latency: ms per forward pass, as deployed
    for column in ("model", "ratio", "threshold", "params", "FLOPs", *(["ms"] if timed else []),
                   *(f"top-1 {m}" for m in modes), *(f"rel. diff {m}" for m in checked)):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, curve in result["curves"].items():
        label = os.path.relpath(name)
        table.add_row(label, "0", "-", human(curve["params"]), human(curve["flops"]),
                      *([f"{curve['latency_ms']:.3g}"] if timed else []),
                      *(percent(curve["top1_unpruned"]) for _ in modes), *("-" for _ in checked))
        for r in curve["rows"]:
            table.add_row("", f"{r['ratio']:g}", f"{r['threshold']:.3g}" if r["threshold"] is not None else "-",
                          human(r["params"]), human(r["flops"]), *([f"{r['latency_ms']:.3g}"] if timed else []),
                          *(percent(r[f"top1_{m}"]) for m in modes), *(f"{r[f'max_rel_diff_{m}']:.0e}" for m in checked))
    return table


def plot_runs(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """Several runs overlaid, from their metrics.jsonl rows: test error %, the fraction of |γ|
    below 1e-2 (how far sparsity has polarised γ), and training images/s, per epoch."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = (("test error %", lambda r: 100 - r["test_top1"]),
              ("|γ| < 1e-2 (fraction)", lambda r: r.get("gamma_frac_below_1e-2")),
              ("train images/s", lambda r: r.get("images_per_sec")))
    for ax, (label, value) in zip(axes, panels):
        for run in runs:
            points = [(r["epoch"], value(r)) for r in run["rows"] if value(r) is not None]
            ax.plot([e for e, _ in points], [v for _, v in points], label=run["label"])
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save_png(fig, path)


def compare_table(runs: list[dict[str, Any]]) -> Table:
    """One row per run: its stage, epochs, best and last top-1, |γ| at the end, speed, machine."""
    table = Table(title="runs compared")
    for column in ("run", "stage", "epochs", "best top-1", "last top-1", "mean |γ|", "|γ|<1e-2", "images/s",
                   "trained on"):
        # The run's name whole, whatever the terminal's width; the machine may wrap.
        table.add_column(column, justify="left" if column in ("run", "stage", "trained on") else "right",
                         no_wrap=column == "run", overflow="fold")
    for run in runs:
        rows, last = run["rows"], run["rows"][-1]
        speeds = sorted(r["images_per_sec"] for r in rows)
        table.add_row(run["label"], run["stage"], str(last["epoch"]), percent(max(r["test_top1"] for r in rows)),
                      percent(last["test_top1"]), f"{last['gamma_mean_abs']:.4f}",
                      f"{100 * last['gamma_frac_below_1e-2']:.0f}%", f"{speeds[len(speeds) // 2]:.0f}",
                      machine_label(run.get("environment")))
    return table
