"""Prune to a target: the smallest global ratio whose pruned model meets a FLOPs or params budget.

A target is a fraction removed (`0.5`: at least half of the FLOPs go) or an absolute count the
pruned model must not exceed (`400M`, `1.2G`, `300k`, `250000`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

from torch import nn

from slimctl.errors import SlimctlError
from slimctl.core.flops import count_flops, count_params
from slimctl.base.groups import ChannelGroup
from slimctl.core.plan import ChannelPlan, make_plan
from slimctl.core.surgery import apply_plan

UNITS = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}


@dataclass(frozen=True)
class Target:
    kind: str  # "flops" | "params"
    text: str  # as the user wrote it
    fraction: float | None = None  # remove at least this fraction …
    count: int | None = None  # … or keep at most this many

    def met(self, value: int, before: int) -> bool:
        if self.fraction is not None:
            return value <= before * (1 - self.fraction)
        return value <= self.count


def parse_target(kind: str, text: str) -> Target:
    """`0.5` → remove ≥ 50%; `400M` / `2.5e8` / `300k` → at most that many. Anything else: SlimctlError."""
    option = f"--target-{kind}"
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not match:
        raise SlimctlError(f"{option} {text!r}: expected a fraction removed like 0.5 or a count like 400M")
    value, unit = float(match.group(1)), match.group(2)
    if unit not in UNITS:
        raise SlimctlError(f"{option} {text!r}: unknown unit {unit!r}; use k, M or G (or none), e.g. 400M")
    if not unit and 0 < value < 1:
        return Target(kind, text, fraction=value)
    count = value * UNITS[unit]
    if not math.isfinite(count):
        raise SlimctlError(f"{option} {text!r}: too large a number")
    if count < 1:
        raise SlimctlError(f"{option} {text!r}: a fraction must be in (0, 1), a count at least 1")
    return Target(kind, text, count=int(count))


def measure(model: nn.Module, kind: str) -> int:
    return count_flops(model) if kind == "flops" else count_params(model)


def search_plan(
    model: nn.Module, groups: list[ChannelGroup], *, measure: Callable[[nn.Module], float],
    met: Callable[[float], bool], min_channels: int, round_to: int, compensate: str = "exact",
    adjust: Callable[[ChannelPlan], ChannelPlan] | None = None,
) -> tuple[ChannelPlan, float, bool]:
    """(plan, its pruned model's `measure`, True) for the smallest ratio whose pruned model meets
    `met`; or (the most pruning's plan, its measure, False) when even that does not.

    Binary search over the k/total ratios (the only ones that differ), assuming that removing more
    channels never makes the measure worse (FLOPs, params; latency up to noise): log2(total) prunes.
    `adjust` (if given) changes each candidate plan before it is measured (e.g. widths as deployed).
    """

    def attempt(k: int) -> tuple[ChannelPlan, float]:
        ratio = (k + 0.5) / total  # int(total · ratio) = k: the k-th smallest score is the threshold
        plan = make_plan(model, groups, ratio, min_channels=min_channels, round_to=round_to)
        if adjust is not None:
            plan = adjust(plan)
        return plan, measure(apply_plan(model, plan, compensate=compensate))

    total = make_plan(model, groups, 0.0, min_channels=min_channels, round_to=round_to).total
    plan, value = attempt(total - 1)
    if not met(value):
        return plan, value, False
    low, high = 0, total - 1  # attempt(high) meets the target; attempt(low - 1) … does not
    best = (plan, value)
    while low < high:
        mid = (low + high) // 2
        plan, value = attempt(mid)
        if met(value):
            high, best = mid, (plan, value)
        else:
            low = mid + 1
    return best[0], best[1], True


def plan_for_target(
    model: nn.Module, groups: list[ChannelGroup], target: Target, *, min_channels: int, round_to: int,
    compensate: str = "exact", adjust: Callable[[ChannelPlan], ChannelPlan] | None = None,
) -> tuple[ChannelPlan, int]:
    """The plan of the smallest ratio that meets `target`, and the pruned model's count (`adjust`:
    see `search_plan`)."""
    before = measure(model, target.kind)
    if target.met(before, before):
        return make_plan(model, groups, 0.0, min_channels=min_channels, round_to=round_to), before
    plan, value, met = search_plan(model, groups, measure=lambda m: measure(m, target.kind),
                                   met=lambda v: target.met(v, before), min_channels=min_channels,
                                   round_to=round_to, compensate=compensate, adjust=adjust)
    if not met:
        reached = f"{100 * (1 - value / before):.1f}% removed, {value:,} left"
        raise SlimctlError(
            f"--target-{target.kind} {target.text} is unreachable: the most pruning can do here is {reached} "
            f"(with --min-channels {min_channels}, --round-to {round_to}); ask for less"
        )
    return plan, int(value)
