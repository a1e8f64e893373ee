"""Prune to a measured latency: `slimctl prune --target-latency 0.6` (of the unpruned model's time)
or `--target-latency 8ms`, measured on this machine as the model is deployed (BNs folded where
exact), for a runtime (torch or onnxruntime), a batch size, a thread count and a precision.

The search is the FLOPs target's (`slimctl.core.targets.search_plan`) with the measured latency as
the measure, each candidate timed between timings of the unpruned model (`paired_measure`); the
result is timed again against the unpruned model, alternating, so the figures recorded in the
checkpoint and printed are from the same conditions and moment. Each model is folded, moved or
exported once per comparison (`latency_clock`), as a deployed model is.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn

from slimctl.base.device import environment, machine_label, resolve_precision, PRECISION_NAMES
from slimctl.base.registry import input_size
from slimctl.core.fold import fold_bn
from slimctl.core.plan import ChannelPlan
from slimctl.core.targets import search_plan
from slimctl.errors import SlimctlError, out_of_memory_as_error
from slimctl.pipeline.bench import RUNTIMES, latency_timer

CONFIRM_ROUNDS = 3  # alternating unpruned / pruned timings behind the recorded figures
PAIRED_ROUNDS = 3  # timings of a candidate (each after one of the unpruned model, for a fraction) per decision

# prune's speed check: the pruned model counts as slower only when its median is above the unpruned
# one's by more than both margins (a shared machine's timing noise; sub-millisecond models jitter).
SLOWER_BY = 0.05  # fraction of the unpruned latency
SLOWER_MS = 0.05  # milliseconds


@dataclass(frozen=True)
class Deploy:
    """Where the pruned model will run: every timing prune makes (`--target-latency`, `--round-to auto`,
    the speed check) is measured under these conditions, on this machine's CPU."""

    runtime: str = "torch"
    batch_size: int = 1
    threads: int | None = None  # None: torch's current thread count
    precision: str = "fp32"  # torch only; onnxruntime runs fp32

    def target(self, text: str, *, repeats: int = 20) -> LatencyTarget:
        """A 'no slower than the unpruned model' target under these conditions (for timing only)."""
        return LatencyTarget(text, fraction=1.0, runtime=self.runtime, batch_size=self.batch_size,
                             threads=self.threads, precision=self.precision, repeats=repeats)


@dataclass(frozen=True)
class LatencyTarget:
    """At most `fraction` of the unpruned model's latency, or at most `ms` milliseconds."""

    text: str  # as the user wrote it
    fraction: float | None = None
    ms: float | None = None
    runtime: str = "torch"
    batch_size: int = 1
    threads: int | None = None  # None: torch's current thread count
    precision: str = "fp32"
    repeats: int = 20

    kind = "latency"

    def met(self, ms: float, unpruned_ms: float) -> bool:
        return ms <= (unpruned_ms * self.fraction if self.fraction is not None else self.ms)


def parse_latency(text: str, **conditions: Any) -> LatencyTarget:
    """`0.6` → at most 60% of the unpruned latency; `8ms` / `8 ms` / `0.008s` → at most 8 ms."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(ms|s)?\s*", text)
    if not match:
        raise SlimctlError(f"--target-latency {text!r}: expected a fraction of the unpruned latency like 0.6, "
                           "or a time like 8ms")
    value, unit = float(match.group(1)), match.group(2)
    if conditions.get("runtime", "torch") not in RUNTIMES:
        raise SlimctlError(f"--runtime must be one of {', '.join(RUNTIMES)}")
    if unit is None:
        if not 0 < value < 1:
            raise SlimctlError(f"--target-latency {text!r}: a fraction must be in (0, 1); a time needs ms or s")
        return LatencyTarget(text, fraction=value, **conditions)
    ms = value * (1000 if unit == "s" else 1)
    if not 0 < ms < 1e7:
        raise SlimctlError(f"--target-latency {text!r}: a time must be above 0 and below 10,000 s")
    return LatencyTarget(text, ms=ms, **conditions)


class _Threads:
    """torch's intra-op thread count set for a block (onnxruntime sessions follow it), then restored."""

    def __init__(self, threads: int | None) -> None:
        self.threads, self.before = threads, torch.get_num_threads()

    def __enter__(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.before)


def latency_clock(model: nn.Module, target: LatencyTarget) -> Callable[[], float]:
    """A function → the median milliseconds of one forward pass of `model` as deployed (eval, BNs
    folded where exact) under `target`'s conditions, on the CPU. The model is folded, moved and (for
    onnxruntime) exported once, here; call the clock as often as needed (alternating rounds)."""
    device = torch.device("cpu")
    dtype = resolve_precision(target.precision, device) if target.runtime == "torch" else None
    size = input_size(model)
    memory = (f"timing at batch size {target.batch_size}", "--latency-batch")
    with _Threads(target.threads), out_of_memory_as_error(*memory):
        timer = latency_timer(fold_bn(model.eval()), batch_size=target.batch_size, input_size=size,
                              runtime=target.runtime, device=device, dtype=dtype)

    def clock() -> float:
        with _Threads(target.threads), out_of_memory_as_error(*memory):
            return timer(repeats=target.repeats, warmup=3)
    return clock


def deployed_latency(model: nn.Module, target: LatencyTarget) -> float:
    """Median milliseconds of one forward pass of `model` as deployed under `target`'s conditions."""
    return latency_clock(model, target)()


def paired_measure(model: nn.Module, target: LatencyTarget) -> tuple[float, Callable[[nn.Module], float]]:
    """(the unpruned model's milliseconds, a measure of candidates) for a latency search. Each
    candidate is timed in PAIRED_ROUNDS rounds between two timings of the unpruned model, so a
    machine that drifts (a shared CPU, a clock that ramps) shifts both: a fraction target gets the
    median of the candidate's time over the geometric mean of the unpruned times around it, × the
    unpruned time; a time target the candidate's median. A single timing per candidate, against one
    unpruned timing at the start, let noise and drift decide where the search stopped."""
    target = replace(target, repeats=max(5, target.repeats // 2))  # per round: about as many runs in all
    reference = latency_clock(model, target)
    unpruned = statistics.median(reference() for _ in range(PAIRED_ROUNDS))

    def measure(candidate: nn.Module) -> float:
        clock = latency_clock(candidate, target)
        if target.fraction is None:  # a time is absolute: the unpruned timings would go unread
            return statistics.median(clock() for _ in range(PAIRED_ROUNDS))
        before, ratios = reference(), []
        for _ in range(PAIRED_ROUNDS):
            ms, after = clock(), reference()
            ratios.append(ms / math.sqrt(before * after))
            before = after
        return unpruned * statistics.median(ratios)
    return unpruned, measure


def plan_for_latency(model: nn.Module, groups, target: LatencyTarget, *, min_channels: int, round_to: int,
                     compensate: str, adjust: Callable[[ChannelPlan], ChannelPlan] | None = None
                     ) -> tuple[ChannelPlan, dict[str, Any]]:
    """The plan of the smallest ratio whose pruned model meets `target`, and the measured record:
    {target, runtime, batch_size, threads, precision, unpruned_ms, pruned_ms, speedup, machine, cut}.
    A model with selections is searched twice, as cut and with its gathered spaces kept whole (a
    DenseNet's gathers can cost more than the narrower convs save, so that only the second reaches
    the time); of those that meet the target, the one keeping the most channels (`cut` names it).
    Unreachable is a SlimctlError with the best latency the most pruning reached. `adjust`: see
    `slimctl.core.targets.search_plan`."""
    unpruned, measure = paired_measure(model, target)
    options = {"as cut": adjust}
    if any(g.selection is not None for g in groups):
        options["gathers kept whole"] = lambda p: _gathers_whole(adjust(p) if adjust else p)
    found = {name: search_plan(model, groups, measure=measure,
                               met=lambda ms: target.met(ms, unpruned), min_channels=min_channels,
                               round_to=round_to, compensate=compensate, adjust=option)
             for name, option in options.items()}
    goal = unpruned * target.fraction if target.fraction is not None else target.ms
    reached = {name: plan for name, (plan, _, met) in found.items() if met}
    if not reached:
        pruned_ms = min(ms for _, ms, _ in found.values())
        raise SlimctlError(
            f"--target-latency {target.text} ({goal:.3g} ms) is unreachable: the most pruning reaches "
            f"{pruned_ms:.3g} ms against {unpruned:.3g} ms unpruned ({unpruned / pruned_ms:.2f}×), "
            f"{target.runtime}, batch {target.batch_size}; ask for less")
    cut = max(reached, key=lambda name: reached[name].kept)  # ties: as cut
    return reached[cut], {**conditions(target), "target": target.text, "target_ms": goal, "cut": cut}


def _gathers_whole(plan: ChannelPlan) -> ChannelPlan:
    return plan.keeping(plan.gathered())


def confirm(model: nn.Module, pruned: nn.Module, record: dict[str, Any], target: LatencyTarget) -> dict[str, Any]:
    """`record` with the unpruned and pruned latency timed again, alternating for CONFIRM_ROUNDS
    rounds (medians), and the speed-up: the figures the checkpoint keeps."""
    times = time_alternatives(model, {"pruned": pruned}, target)
    unpruned_ms, pruned_ms = times["unpruned"], times["pruned"]
    return {**record, "unpruned_ms": unpruned_ms, "pruned_ms": pruned_ms, "speedup": unpruned_ms / pruned_ms,
            "met": target.met(pruned_ms, unpruned_ms)}


def conditions(target: LatencyTarget) -> dict[str, Any]:
    """What a latency was measured under: runtime, batch, threads, precision and the machine."""
    threads = target.threads or torch.get_num_threads()
    dtype = resolve_precision(target.precision, torch.device("cpu")) if target.runtime == "torch" else None
    with _Threads(threads):
        machine = machine_label(environment(torch.device("cpu"), dtype))
    return {"runtime": target.runtime, "batch_size": target.batch_size, "threads": threads,
            "precision": PRECISION_NAMES.get(dtype, "fp32"), "machine": machine}


def speed_check(model: nn.Module, pruned: nn.Module, deploy: Deploy = Deploy()) -> dict[str, Any]:
    """prune's check that pruning paid off: both models timed as deployed under `deploy` (alternating
    rounds, medians), `slower` when the pruned one is beyond the noise margins (SLOWER_BY, SLOWER_MS)."""
    target = deploy.target("speed check", repeats=10)
    record = confirm(model, pruned, conditions(target), target)
    record["slower"] = is_slower(record["pruned_ms"], record["unpruned_ms"])
    del record["met"]
    return record


def is_slower(ms: float, unpruned_ms: float) -> bool:
    """Slower than the unpruned model beyond the noise margins."""
    return ms > unpruned_ms * (1 + SLOWER_BY) + SLOWER_MS


def is_faster(ms: float, unpruned_ms: float) -> bool:
    """Faster than the unpruned model beyond the noise margins (a cut within them may be slower)."""
    return ms * (1 + SLOWER_BY) + SLOWER_MS < unpruned_ms


def time_alternatives(model: nn.Module, alternatives: dict[str, nn.Module], target: LatencyTarget
                      ) -> dict[str, float]:
    """Median milliseconds of each alternative pruned model, alternating with the unpruned `model`
    (CONFIRM_ROUNDS rounds), under `target`'s conditions; key "unpruned" is the unpruned model's time."""
    clocks = {"unpruned": latency_clock(model, target),
              **{name: latency_clock(alternative, target) for name, alternative in alternatives.items()}}
    times: dict[str, list[float]] = {name: [] for name in clocks}
    for _ in range(CONFIRM_ROUNDS):
        for name, clock in clocks.items():
            times[name].append(clock())
    return {name: statistics.median(t) for name, t in times.items()}
