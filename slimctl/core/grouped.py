"""Whole groups of grouped convolutions: a plan that drops some of a grouped conv's groups outright.

The plain plan keeps the same number of channels in every group of a grouped conv (ResNeXt's 32
groups of 4 become 32 groups of 2). Kernel libraries run narrow groups poorly: ResNeXt-50's first
3×3 grouped conv at batch 16 took 3.05 ms with 32 groups of 2 channels and 2.28 ms with 16 groups
of 4 (torch, an Intel Xeon, 2 threads; `scripts/bench_grouped.py`), though the second keeps twice
the multiply-adds. Dropping whole groups gives a conv with fewer groups of the original width.
Which runs faster depends on the widths and the runtime (wide groups favour the plain plan), so
prune decides by timing whole models (`--round-to auto`, the speed check).

A grouped conv reads one space and produces another: dropping its group j removes the j-th chunk of
both. So the spaces joined through grouped convs form a *linked set* that keeps the same chunks.
A set qualifies when every grouped conv touching it has both its spaces in the plan, each space
divided as the conv is. The removed input chunks feed only removed output groups, so they need no
compensation; the removed output channels are compensated at their other consumers as usual.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from slimctl.core.plan import ChannelPlan, GroupPlan, group_scores


def grouped_convs(modules: dict[str, nn.Module]) -> dict[str, nn.Conv2d]:
    """Name → conv with groups > 1 that is not depthwise (one filter per channel)."""
    return {name: m for name, m in modules.items() if isinstance(m, nn.Conv2d) and m.groups > 1
            and not m.groups == m.in_channels == m.out_channels}


def linked_sets(model: nn.Module, plan: ChannelPlan) -> list[tuple[int, ...]]:
    """Indices of `plan.groups` joined through grouped convs (see the module's text), each set that
    qualifies for whole-group pruning, in plan order."""
    convs = grouped_convs(dict(model.named_modules()))
    parent = list(range(len(plan.groups)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    sides: dict[str, tuple[list[int], list[int]]] = {name: ([], []) for name in convs}
    for i, gp in enumerate(plan.groups):
        for name in gp.group.producers:
            if name in sides:
                sides[name][1].append(i)
        for consumer in gp.group.consumers:
            if consumer.module in sides:
                sides[consumer.module][0].append(i)
    bad: set[int] = set()
    for name, (reads, makes) in sides.items():
        touched = reads + makes
        if not touched:
            continue
        if len(reads) != 1 or len(makes) != 1 or not all(_whole_divisible(plan.groups[i], convs[name])
                                                          for i in touched):
            bad.update(touched)  # one side kept, or read inside a concatenation: channels per group only
        for i in touched[1:]:
            parent[find(i)] = find(touched[0])
    sets: dict[int, list[int]] = {}
    for name, (reads, makes) in sides.items():
        for i in reads + makes:
            sets.setdefault(find(i), []).append(i)
    return [tuple(sorted(set(members))) for members in sets.values()
            if not any(find(b) == find(members[0]) for b in bad)]


def _whole_divisible(gp: GroupPlan, conv: nn.Conv2d) -> bool:
    group = gp.group
    return (group.divisions == conv.groups and group.selection is None and not group.slices
            and not group.coupled and gp.total % conv.groups == 0)


def whole_groups(model: nn.Module, plan: ChannelPlan, *, min_channels: int = 1) -> ChannelPlan:
    """`plan` with each linked set keeping whole chunks: k = ⌈G · kept / total⌉ of its G chunks (kept
    and total summed over the set's spaces, so never fewer channels than γ chose in all), at least
    `min_channels` in each space; the chunks whose channels have the largest mean |γ| over the set.
    A set the plan leaves whole stays whole."""
    groups = list(plan.groups)
    links = list(plan.links)
    for members in linked_sets(model, plan):
        plans = [plan.groups[i] for i in members]
        kept, total = sum(gp.kept for gp in plans), sum(gp.total for gp in plans)
        if kept == total:
            continue
        divisions = plans[0].group.divisions
        least = max(math.ceil(min_channels / (gp.total // divisions)) for gp in plans)
        k = min(divisions, max(least, math.ceil(divisions * kept / total)))
        score = sum(group_scores(model, gp.group).view(divisions, -1).mean(1) for gp in plans)
        chosen = torch.sort(torch.sort(score, descending=True, stable=True).indices[:k]).values
        for i, gp in zip(members, plans):
            per = gp.total // divisions
            keep = (chosen[:, None] * per + torch.arange(per)).flatten()
            groups[i] = GroupPlan(group=gp.group, keep=keep, total=gp.total)
        links.append(members)
    return replace(plan, groups=tuple(groups), links=tuple(links))
