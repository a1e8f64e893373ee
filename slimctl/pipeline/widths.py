"""`prune --round-to auto`: channel counts chosen by measurement, per layer and as a whole.

γ decides how many channels a layer needs (n); a vector unit or a kernel library may run n + 3
channels faster than n (16 at the price of 13). For each group the plan cuts, the candidate counts
are n and the multiples of 2…64 at most SLACK above it (at least up to the next multiple of 8), never
more than the layer has and never fewer than n. A count's cost is the time of the convolutions and
linear layers whose shapes it sets: the group's producers (out = count; a depthwise conv in = out =
groups = count) and consumers (in = the columns it reads), each at the width the plan gives its
other side. The cheapest count wins; a larger one only when it is faster by more than PREFER_FEWER
(timing noise must not buy channels). Keeping extra channels keeps the next-highest γ.

The timings are cached per machine, runtime, batch size, threads and precision in the user's cache
folder (`slimctl.pipeline.opclock`): a second prune on this machine times only shapes it has not
seen. The operator clock times torch; under onnxruntime there is no per-layer choice.

Groups are chosen one at a time, each with the others at γ's counts, and an operator timed alone
misses what a runtime does across layers (onnxruntime and oneDNN keep a blocked layout from one
convolution to the next only when every width is a multiple of the block). So the whole model
decides last (`auto_widths`): γ's counts, the per-layer choice and every count rounded up to a
multiple of 8 and of 16 (`rounded_plans`) and, on a model with grouped convolutions, whole groups
kept or dropped (`slimctl.core.grouped`) are built and timed as deployed under the conditions the
user deploys to, alternating, and the fastest is kept.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from slimctl.base.registry import input_size
from slimctl.core.fold import carried_producers
from slimctl.core.grouped import linked_sets, whole_groups
from slimctl.core.plan import ChannelPlan, GroupPlan, group_scores, keep_largest, plan_masks
from slimctl.core.surgery import applied_plan
from slimctl.core.targets import Target, plan_for_target
from slimctl.errors import SlimctlError
from slimctl.pipeline.latency import Deploy, LatencyTarget, conditions, plan_for_latency, time_alternatives
from slimctl.pipeline.opclock import OpClock

SLACK = 0.125  # a layer may keep up to 12.5% more channels than γ chose
QUANTA = (2, 4, 8, 16, 32, 64)
PREFER_FEWER = 0.02  # a larger count must be this much faster (fraction of the cost) to be chosen
WHOLE_QUANTA = (8, 16)  # the uniform multiples also timed as whole models


def candidates(n: int, total: int) -> list[int]:
    """γ's count `n` and the multiples of QUANTA a little above it, at most `total`."""
    top = min(total, max(math.ceil(n * (1 + SLACK)), -(-n // 8) * 8))
    return sorted({n} | {-(-n // q) * q for q in QUANTA if -(-n // q) * q <= top})


def measured_counts(model: nn.Module, groups, plan: ChannelPlan, target, latency: dict[str, Any] | None, *,
                    min_channels: int, compensate: str, deploy: Deploy) -> tuple[ChannelPlan, dict[str, Any], Any]:
    """`--round-to auto` beside a latency target (`latency_widths`), another target (`target_widths`)
    or a ratio (`auto_widths`): (plan, widths record, the latency record of the plan written)."""
    if isinstance(target, LatencyTarget):
        return latency_widths(model, groups, target, plan, latency, min_channels=min_channels, compensate=compensate)
    if target is not None:
        return (*target_widths(model, groups, target, plan, min_channels=min_channels, compensate=compensate,
                               deploy=deploy), latency)
    return (*auto_widths(model, plan, compensate=compensate, deploy=deploy), latency)


def auto_widths(model: nn.Module, plan: ChannelPlan, *, compensate: str, deploy: Deploy = Deploy()
                ) -> tuple[ChannelPlan, dict[str, Any]]:
    """`prune --round-to auto`: the fastest, timed as a whole under `deploy` (BNs folded, alternating
    rounds), of γ's counts, the counts `measured_widths` chooses op by op (torch only: its clock times
    torch operators) and every count rounded up to a multiple of each of WHOLE_QUANTA. Another plan
    than γ's must be faster by more than PREFER_FEWER. The record says which won and what each timed."""
    record: dict[str, Any] = {"changed": [], "timed": 0, "cache": None}
    options, op_costs = {"γ's counts": plan}, {}
    if deploy.runtime == "torch":
        clock = OpClock(conditions(deploy.target("widths")))
        chosen, changes = measured_widths(model, plan, clock)
        record.update(timed=clock.timed, cache=str(clock.path))
        options["per layer"] = chosen
        op_costs = {c["name"]: c for c in changes}
    options.update(rounded_plans(model, plan, compensate=compensate))
    if linked_sets(model, plan):
        options["whole groups"] = whole_groups(model, plan)
    chosen, record = _fastest(model, distinct(options), compensate=compensate, deploy=deploy, record=record)
    if record["chosen"] != "γ's counts":
        record["changed"] = [{"name": new.group.bn, "gamma": old.kept, "chosen": new.kept,
                              **({k: op_costs[new.group.bn][k] for k in ("ms_gamma", "ms_chosen")}
                                 if record["chosen"] == "per layer" else {})}
                             for old, new in zip(plan.groups, chosen.groups) if new.kept != old.kept]
    return chosen, record


def _fastest(model: nn.Module, options: dict[str, ChannelPlan], *, compensate: str, deploy: Deploy,
             record: dict[str, Any]) -> tuple[ChannelPlan, dict[str, Any]]:
    """The plan of `options` (the first: γ's counts) whose model times fastest as a whole under
    `deploy`, alternating; another than the first only when faster by more than PREFER_FEWER.
    `record` gains {chosen, candidates: {name: ms}}."""
    first = next(iter(options))
    if len(options) == 1:
        return options[first], {**record, "chosen": first, "candidates": {}}
    built = {name: applied_plan(model, p, compensate=compensate)[0].eval() for name, p in options.items()}
    times = time_alternatives(built.pop(first), built, deploy.target("widths", repeats=10))
    times = {first: times.pop("unpruned"), **times}
    best = min(times, key=times.get)
    if times[best] >= times[first] * (1 - PREFER_FEWER):
        best = first
    return options[best], {**record, "chosen": best, "candidates": times}


def target_widths(model: nn.Module, groups, target: Target, plan: ChannelPlan, *, min_channels: int,
                  compensate: str, deploy: Deploy = Deploy()) -> tuple[ChannelPlan, dict[str, Any]]:
    """`prune --round-to auto --target-flops/--target-params`: `plan` (the target's search with
    γ's counts) against the searches with every count a multiple of each of WHOLE_QUANTA, each at the
    target; the fastest as a whole under `deploy` (another than γ's by more than PREFER_FEWER). A
    multiple that cannot meet the target is left out."""
    options = {"γ's counts": plan}
    for name, (round_to, adjust) in searches(model, plan, min_channels=min_channels, compensate=compensate).items():
        try:
            options[name] = plan_for_target(model, groups, target, min_channels=min_channels, round_to=round_to,
                                            compensate=compensate, adjust=adjust)[0]
        except SlimctlError:  # unreachable that way
            continue
    return _fastest(model, distinct(options), compensate=compensate, deploy=deploy,
                    record={"changed": [], "timed": 0, "cache": None})


def latency_widths(model: nn.Module, groups, target: LatencyTarget, plan: ChannelPlan, record: dict[str, Any], *,
                   min_channels: int, compensate: str) -> tuple[ChannelPlan, dict[str, Any], dict[str, Any]]:
    """`prune --round-to auto --target-latency`: `plan` (the target's search with γ's counts, which
    measured `record`) against the searches with every count a multiple of each of WHOLE_QUANTA; of
    those that meet the target, the one keeping the most channels (the least pruning for that time).
    (plan, widths record {chosen, kept: {name: channels}}, its latency record)."""
    found = {"γ's counts": (plan, record)}
    for name, (round_to, adjust) in searches(model, plan, min_channels=min_channels, compensate=compensate).items():
        try:
            found[name] = plan_for_latency(model, groups, target, min_channels=min_channels, round_to=round_to,
                                           compensate=compensate, adjust=adjust)
        except SlimctlError:  # unreachable that way
            continue
    kept = {name: p.kept for name, (p, _) in found.items()}
    best = max(kept, key=kept.get)  # ties: the first, γ's counts
    chosen, measured = found[best]
    return chosen, {"changed": [], "timed": 0, "cache": None, "chosen": best, "candidates": {}, "kept": kept}, measured


def rounded_plans(model: nn.Module, plan: ChannelPlan, *, compensate: str = "exact") -> dict[str, ChannelPlan]:
    """`plan` with every cut group's count rounded up so that each division (each group of the grouped
    convolutions that read or produce it; the whole space otherwise) keeps a multiple of q, at most its
    width, for each q of WHOLE_QUANTA: a kernel library's blocked layouts (onnxruntime's, oneDNN's)
    want such widths throughout, which no single operator's timing shows. The extra channels are the
    next-highest γ. Then `aligned`: the widths as deployed stay multiples of q."""
    modules = dict(model.named_modules())
    out = {}
    for q in WHOLE_QUANTA:
        groups = []
        for gp in plan.groups:
            if gp.kept == gp.total or gp.group.selection is not None:
                groups.append(gp)
                continue
            step = q * _step(gp, modules)  # q per division: each group of a grouped conv is its own GEMM
            groups.append(_with_count(model, gp, min(gp.total, -(-gp.kept // step) * step)))
        rounded = ChannelPlan(plan.ratio, plan.threshold, tuple(groups))
        out[f"multiples of {q}"] = aligned(model, rounded, q, compensate=compensate,
                                          floor={gp.group.bn: gp.kept for gp in plan.groups})
    return out


def aligned(model: nn.Module, plan: ChannelPlan, q: int, *, compensate: str, floor: dict[str, int] | None = None,
            least: int = 1) -> ChannelPlan:
    """`plan` (counts in multiples of q) with each group whose producer `fold_bn` widens by one
    constant channel (exact compensation of a padded consumer) one channel narrower, so that the
    deployed width is a multiple of q again; where that would fall below `floor` (γ's count), q − 1
    wider instead (at most the group's width); never below `least` (--min-channels). Without a floor
    (a target's plan) nothing is widened. A group of grouped convolutions is left as it is."""
    if compensate != "exact":
        return plan
    carried = carried_producers(applied_plan(model, plan, compensate=compensate)[0].eval())
    if not carried:
        return plan
    modules = dict(model.named_modules())
    groups = []
    for gp in plan.groups:
        if gp.kept == gp.total or not carried & set(gp.group.producers) or _step(gp, modules) > 1:
            groups.append(gp)
            continue
        if gp.kept - 1 >= max(least, (floor or {}).get(gp.group.bn, 1)):
            count = gp.kept - 1
        else:  # a target's plan (no floor) is not widened: it would miss the target
            count = gp.kept if floor is None else min(gp.total, gp.kept + q - 1)
        groups.append(_with_count(model, gp, count))
    return ChannelPlan(plan.ratio, plan.threshold, tuple(groups))


def aligner(model: nn.Module, q: int, compensate: str, min_channels: int):
    """`aligned` for a target's search (`adjust`): each candidate one channel narrower where its
    deployed width would be one above a multiple of q (never wider: the target decides the count)."""
    return lambda plan: aligned(model, plan, q, compensate=compensate, least=min_channels)


def searches(model: nn.Module, plan: ChannelPlan, *, min_channels: int, compensate: str
             ) -> dict[str, tuple[int, Callable[[ChannelPlan], ChannelPlan]]]:
    """The searches run beside γ's counts at a target, by name: (round_to, adjust) with every count
    a multiple of each of WHOLE_QUANTA, and whole groups of grouped convs where the model has any."""
    found = {f"multiples of {q}": (q, aligner(model, q, compensate, min_channels)) for q in WHOLE_QUANTA}
    if linked_sets(model, plan):
        found["whole groups"] = (1, lambda p: whole_groups(model, p, min_channels=min_channels))
    return found


def distinct(options: dict[str, ChannelPlan]) -> dict[str, ChannelPlan]:
    """The plans that keep other channels than every earlier one (the first of equals stays)."""
    seen, out = set(), {}
    for name, p in options.items():
        counts = tuple(tuple(gp.keep.tolist()) for gp in p.groups)
        if counts not in seen:
            seen.add(counts)
            out[name] = p
    return out


def measured_widths(model: nn.Module, plan: ChannelPlan, clock: OpClock) -> tuple[ChannelPlan, list[dict]]:
    """`plan` with each cut group's count chosen among `candidates` by `clock`; and per changed group
    {name, gamma, chosen, ms_gamma, ms_chosen}."""
    modules = dict(model.named_modules())
    out_keep, in_mask, _ = plan_masks(modules, plan)
    planned = {name: (int(in_mask[name].sum()) if name in in_mask else _width(m, "in"),
                      len(out_keep[name]) if name in out_keep else _width(m, "out"))
               for name, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))}
    sizes = _input_sizes(model)
    groups, changes = [], []
    for gp in plan.groups:
        if gp.kept == gp.total or gp.group.selection is not None:  # a gather's cost is not a width's
            groups.append(gp)
            continue
        step = _step(gp, modules)  # a count must split evenly into the group's divisions and conv groups
        counts = [c for c in candidates(gp.kept, gp.total) if c == gp.kept or c % step == 0]
        costs = {c: _cost(gp, c, modules, planned, sizes, clock) for c in counts}
        best = gp.kept
        for count in sorted(costs):
            if costs[count] < costs[best] * (1 - PREFER_FEWER):
                best = count
        groups.append(_with_count(model, gp, best))
        if best != gp.kept:
            changes.append({"name": gp.group.bn, "gamma": gp.kept, "chosen": best, "ms_gamma": costs[gp.kept],
                            "ms_chosen": costs[best]})
    clock.save()
    return ChannelPlan(plan.ratio, plan.threshold, tuple(groups)), changes


def _cost(gp: GroupPlan, count: int, modules: dict[str, nn.Module], planned: dict[str, tuple[int, int]],
          sizes: dict[str, tuple[int, int]], clock: OpClock) -> float:
    """Milliseconds of the ops whose shapes the group's count sets, at `count` channels."""
    widths: dict[str, list[int]] = {}
    for name in gp.group.producers:  # BNs and other per-channel layers cost little: only convs and linears
        if name in planned:
            widths.setdefault(name, list(planned[name]))[1] = count
    for consumer in gp.group.consumers:
        if consumer.module in planned:
            width = widths.setdefault(consumer.module, list(planned[consumer.module]))
            width[0] += (count - gp.kept) * consumer.repeat
    total = 0.0
    for name, (c_in, c_out) in widths.items():
        module = modules[name]
        if isinstance(module, nn.Linear):
            total += clock.ms(("linear", c_in, c_out))
            continue
        groups = module.groups
        if groups > 1 and groups == module.in_channels == module.out_channels:  # depthwise: one width
            c_in = c_out = groups = count
        total += clock.ms(("conv", c_in, c_out, *module.kernel_size, *module.stride, *_padding(module),
                           *module.dilation, groups, *sizes[name]))
    return total


def _step(gp: GroupPlan, modules: dict[str, nn.Module]) -> int:
    """The multiple every count of this group must be: its divisions, and the groups of each grouped
    (not depthwise) convolution that produces or reads it."""
    step = max(1, gp.group.divisions)
    for name in (*gp.group.producers, *(c.module for c in gp.group.consumers)):
        module = modules.get(name)
        if isinstance(module, nn.Conv2d) and 1 < module.groups and not module.groups == module.in_channels == \
                module.out_channels:
            step = math.lcm(step, module.groups)
    return step


def _with_count(model: nn.Module, gp: GroupPlan, count: int) -> GroupPlan:
    if count == gp.kept:
        return gp
    keep = keep_largest(group_scores(model, gp.group), count, gp.group.divisions)
    return GroupPlan(group=gp.group, keep=keep, total=gp.total)


def _width(module: nn.Module, side: str) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features if side == "in" else module.out_features
    return module.in_channels if side == "in" else module.out_channels


def _padding(conv: nn.Conv2d) -> tuple[int, int]:
    if isinstance(conv.padding, str):  # "same"/"valid": what it comes to for an odd kernel at stride 1
        return (0, 0) if conv.padding == "valid" else tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    return tuple(conv.padding)


@torch.no_grad()
def _input_sizes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Each convolution's input height and width, from one forward pass at the model's input size."""
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:  # returns None: the input passes unchanged
            sizes.setdefault(name, tuple(args[0].shape[-2:]))
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    training = model.training
    try:
        model.eval()(torch.zeros(1, *input_size(model)))
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return sizes
