"""The accuracy-vs-ratio curve of one model, without writing a checkpoint.

One trace (the channel groups), then per ratio one plan and one surgery per compensation mode, and
an evaluation on a fixed test set: how much of the network can go before accuracy drops.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from slimctl.errors import SlimctlError
from slimctl.core.flops import count_flops, count_params
from slimctl.base.groups import ChannelGroup
from slimctl.core.plan import make_plan, validate_ratio
from slimctl.core.exactness import THRESHOLD, measure_exactness
from slimctl.core.surgery import applied_plan

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
    latency: Callable[[nn.Module], float] | None = None,
) -> list[dict[str, Any]]:
    """One row per ratio: threshold, params, FLOPs, and top-1 right after pruning per mode, with the
    pruned model's measured distance to what its mode promises (`max_rel_diff_<mode>`,
    slimctl.core.exactness); with `recalibrate` (slimctl.core.recalibrate), also the first mode's top-1 once
    its BN statistics are re-estimated, as top1_<mode>_recal. Channels kept, params and FLOPs are the
    first mode's (which keeps whole the groups it cannot compensate), as is `latency_ms` when
    `latency` times a model."""
    rows = []
    for ratio in ratios:
        plan = make_plan(model, groups, ratio, min_channels=min_channels, round_to=round_to)
        row: dict[str, Any] = {"ratio": ratio, "threshold": plan.threshold, "channels_total": plan.total}
        for mode in modes:
            pruned, _, applied = applied_plan(model, plan, compensate=mode)
            pruned.eval()
            if mode == modes[0]:
                row.update(channels_kept=applied.kept, params=count_params(pruned), flops=count_flops(pruned))
                if latency is not None:
                    row["latency_ms"] = latency(pruned)
            row[f"max_rel_diff_{mode}"] = measure_exactness(model, pruned, applied, mode).max_rel_diff
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


def sweep_warnings(result: dict[str, Any]) -> list[str]:
    """One line per curve and mode whose pruned models missed what the mode promises (`exact`: the
    γ-zeroed original, `none`: the γβ-zeroed one) by more than slimctl.core.exactness.THRESHOLD."""
    lines = []
    for name, curve in result["curves"].items():
        for mode in ("exact", "none"):
            bad = [r for r in curve["rows"] if r.get(f"max_rel_diff_{mode}", 0.0) >= THRESHOLD]
            if bad:
                worst = max(r[f"max_rel_diff_{mode}"] for r in bad)
                ratios = ", ".join(f"{r['ratio']:g}" for r in bad)
                lines.append(f"{name}: with --compensate {mode} the pruned model differs from its reference by up "
                             f"to {worst:.1e} at ratios {ratios}; "
                             "`slimctl prune` at one of them names the layers")
    return lines
