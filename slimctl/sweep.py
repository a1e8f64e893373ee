"""The accuracy-vs-ratio curve of one model, without writing a checkpoint.

One trace (the channel groups), then per ratio one plan and one surgery per compensation mode, and
an evaluation on a fixed test set: how much of the network can go before accuracy drops.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from slimctl.errors import SlimctlError
from slimctl.flops import count_flops, count_params
from slimctl.groups import ChannelGroup
from slimctl.plan import make_plan, validate_ratio
from slimctl.surgery import apply_plan

DEFAULT_RATIOS = tuple(round(0.1 * i, 1) for i in range(1, 10))  # 0.1 … 0.9


def parse_ratios(text: str) -> list[float]:
    """'0.3,0.5,0.7' → [0.3, 0.5, 0.7]; empty, malformed or out of [0, 1): SlimctlError."""
    try:
        ratios = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise SlimctlError(f"--ratios expects comma-separated fractions like 0.3,0.5,0.7, got {text!r}") from None
    if not ratios:
        raise SlimctlError("--ratios is empty; give comma-separated fractions like 0.3,0.5,0.7")
    for r in ratios:
        validate_ratio(r, "--ratios: each ratio")
    return sorted(set(ratios))


def sweep_model(
    model: nn.Module,
    groups: list[ChannelGroup],
    ratios: list[float],
    top1: Callable[[nn.Module], float],
    *,
    modes: tuple[str, ...],
    min_channels: int = 1,
    round_to: int = 1,
    on_ratio: Callable[[float], None] | None = None,
    recalibrate: Callable[[nn.Module], int] | None = None,
) -> list[dict[str, Any]]:
    """One row per ratio: threshold, params, FLOPs, and top-1 right after pruning per mode; with
    `recalibrate` (slimctl.recalibrate), also the first mode's top-1 once its BN statistics are
    re-estimated, as top1_<mode>_recal."""
    rows = []
    for ratio in ratios:
        plan = make_plan(model, groups, ratio, min_channels=min_channels, round_to=round_to)
        row: dict[str, Any] = {"ratio": ratio, "threshold": plan.threshold, "channels_kept": plan.kept,
                               "channels_total": plan.total}
        for mode in modes:
            pruned = apply_plan(model, plan, compensate=mode).eval()
            if mode == modes[0]:
                row.update(params=count_params(pruned), flops=count_flops(pruned))
            row[f"top1_{mode}"] = top1(pruned)
            if mode == modes[0] and recalibrate is not None:
                recalibrate(pruned)
                row[f"top1_{mode}_recal"] = top1(pruned)
        rows.append(row)
        if on_ratio is not None:
            on_ratio(ratio)
    return rows


def largest_safe_ratio(rows: list[dict[str, Any]], unpruned_top1: float, tolerance: float, mode: str) -> float | None:
    """The largest ratio whose top-1 (in `mode`, e.g. exact or exact_recal) is within `tolerance`
    points of the unpruned model's, with every smaller ratio within it too (a curve that dips and
    recovers does not count past the dip)."""
    best = None
    for row in sorted(rows, key=lambda r: r["ratio"]):
        if row[f"top1_{mode}"] < unpruned_top1 - tolerance:
            break
        best = row["ratio"]
    return best
