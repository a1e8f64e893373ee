"""The channel plan: which channels of which groups survive pruning (pure ranking; no model changes).

`make_plan` turns channel groups (`slimctl.base.groups`) and a ratio into kept indices with the paper's
single global threshold over |γ|; `slimctl.core.surgery` applies the plan. Both are family-agnostic:
declared and traced groups feed the same functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from slimctl.errors import SlimctlError
from slimctl.base.groups import REDUCTIONS, ChannelGroup


@dataclass(frozen=True)
class GroupPlan:
    group: ChannelGroup
    keep: torch.Tensor  # sorted int64 positions (within the group's current space) that survive
    total: int  # the space's width before this prune

    @property
    def kept(self) -> int:
        return int(self.keep.numel())

    @property
    def removed(self) -> torch.Tensor:
        """Sorted int64 positions (within the group's current space) that go."""
        mask = torch.ones(self.total, dtype=torch.bool)
        mask[self.keep] = False
        return torch.arange(self.total)[mask]


@dataclass(frozen=True)
class ChannelPlan:
    ratio: float
    threshold: float | None  # None at ratio 0: nothing is removed
    groups: tuple[GroupPlan, ...]
    # Indices of `groups` that keep the same whole chunks of grouped convs (`slimctl.core.grouped`):
    # one of them kept whole keeps the others whole too, or a conv's two sides would disagree.
    links: tuple[tuple[int, ...], ...] = ()

    def layers(self) -> list[dict]:
        """Per ranked BN: {name, kept, total} (the JSON/table view)."""
        return [{"name": g.group.bn, "kept": g.kept, "total": g.total} for g in self.groups]

    @property
    def kept(self) -> int:
        return sum(g.kept for g in self.groups)

    def keeping(self, indices: set[int]) -> ChannelPlan:
        """This plan with the groups at `indices` (and those linked to them) kept whole."""
        indices = set(indices).union(*(link for link in self.links if indices & set(link)))
        groups = tuple(GroupPlan(g.group, torch.arange(g.total), g.total) if i in indices else g
                       for i, g in enumerate(self.groups))
        return ChannelPlan(self.ratio, self.threshold, groups, self.links)

    @property
    def total(self) -> int:
        return sum(g.total for g in self.groups)

    def gathered(self) -> set[int]:
        """The groups this plan cuts through a selection (a gather over a concatenation or a split,
        whose BN and ReLU still run at full width)."""
        return {i for i, g in enumerate(self.groups) if g.group.selection is not None and g.kept < g.total}


def group_scores(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """|γ| of the group's current channels (for a selection group: only the still-selected ones), a
    channel's several |γ| (extra BNs, slices of BNs over concatenations) reduced by `group.reduce`."""
    def gammas(name: str) -> torch.Tensor:
        return model.get_submodule(name).weight.detach().abs().float().cpu()

    ranks = [gammas(n) for n in group.bns] + [gammas(n)[offset:offset + width] for n, offset, width in group.slices]
    gamma = ranks[0]
    if len(ranks) > 1:
        if group.reduce not in REDUCTIONS:
            raise SlimctlError(f"unknown score reduction {group.reduce!r}; use one of {', '.join(REDUCTIONS)}")
        stacked = torch.stack(ranks)
        gamma = {"max": stacked.amax(0), "mean": stacked.mean(0), "sum": stacked.sum(0)}[group.reduce]
    if group.selection is not None:
        gamma = gamma[model.get_submodule(group.selection).indices.cpu()]
    return gamma


def validate_ratio(ratio: float, name: str = "--ratio") -> None:
    if not 0 <= ratio < 1:
        raise SlimctlError(
            f"{name} must be in [0, 1) (the fraction of all BN channels to remove), got {ratio}"
        )


def global_threshold(scores: torch.Tensor, ratio: float) -> float | None:
    """The paper's rule: sort all |γ|, take the value at index int(total·ratio); keep |γ| > it.

    At ratio 0 nothing is removed (the literal rule would still drop the smallest channel).
    """
    if ratio == 0:
        return None
    ordered = torch.sort(scores).values
    return float(ordered[int(scores.numel() * ratio)])


# --ratio auto. A gap between two consecutive sorted |γ| is clear when the larger is at least GAP_FACTOR
# times the smaller; |γ| below FLOOR × the largest count as that floor (float noise of unused channels,
# or polarization's exact zeros), so a run of near-zero values never makes a gap of its own.
GAP_FACTOR = 10.0
GAP_FLOOR = 1e-6
GAP_MIN_KEPT = 0.05  # the cut keeps at least this share of the channels: a few large |γ| above an
# unpolarized spread make a wide gap too, at the top, and cutting there would remove nearly everything


@dataclass(frozen=True)
class GapCut:
    """Where `--ratio auto` cut: between the largest removed |γ| and the smallest kept one."""

    ratio: float  # the ratio whose global threshold is `below`: keeps exactly the |γ| > below
    below: float
    above: float
    removed: int
    total: int

    def as_dict(self) -> dict[str, float | int]:
        return {"ratio": self.ratio, "below": self.below, "above": self.above, "removed": self.removed,
                "total": self.total, "factor": self.above / max(self.below, GAP_FLOOR * self.above)}


def gap_cut(scores: torch.Tensor) -> GapCut:
    """The cut at the widest gap of the sorted |γ| on a log scale (what a polarized distribution has
    between its zeros and the rest), if it is clear (GAP_FACTOR); else a SlimctlError."""
    ordered = torch.sort(scores.detach().float().flatten()).values
    total = int(ordered.numel())
    if total < 2:
        raise SlimctlError("--ratio auto needs at least two ranked channels")
    floor = GAP_FLOOR * float(ordered[-1])
    factors = ordered[1:] / ordered[:-1].clamp_min(floor) if floor > 0 else torch.zeros(total - 1)
    last = max(0, total - 1 - math.ceil(GAP_MIN_KEPT * total))  # the highest cut that keeps GAP_MIN_KEPT
    factors = factors[: last + 1]
    k = int(factors.argmax())  # the gap between ordered[k] and ordered[k + 1]
    if not float(factors[k]) >= GAP_FACTOR:
        raise SlimctlError(
            f"--ratio auto found no clear gap in |γ| (no |γ| is {GAP_FACTOR:g}× the one below it; the widest is "
            f"{float(factors[k]):.3g}×): γ did not polarize; choose a --ratio from `slimctl sweep`, or sparse-train "
            "with train.regularizer: polarization"
        )
    removed = k + 1
    # global_threshold takes the |γ| at index int(total·ratio) = k, and keeps what is above it.
    return GapCut(ratio=(removed - 0.5) / total, below=float(ordered[k]), above=float(ordered[k + 1]),
                  removed=removed, total=total)


def make_plan(
    model: nn.Module,
    groups: list[ChannelGroup],
    ratio: float,
    *,
    min_channels: int = 1,
    round_to: int = 1,
) -> ChannelPlan:
    """One global threshold over every group's |γ|; each group keeps ≥ `min_channels` channels
    (its largest |γ|), and with `round_to` > 1 a multiple of it (never more than the group has)."""
    validate_ratio(ratio)
    if min_channels < 1:
        raise SlimctlError(f"--min-channels must be >= 1, got {min_channels}")
    if round_to < 1:
        raise SlimctlError(f"--round-to must be >= 1, got {round_to}")
    if not groups:
        raise SlimctlError("the model has no prunable channel groups")
    scores = [group_scores(model, g) for g in groups]
    threshold = global_threshold(torch.cat(scores), ratio)
    plans = []
    for group, score in zip(groups, scores):
        total = score.numel()
        n_keep = total if threshold is None else int((score > threshold).sum())
        n_keep = max(n_keep, min(min_channels, total))
        n_keep = min(total, -(-n_keep // round_to) * round_to)  # round up to a multiple of round_to
        plans.append(GroupPlan(group=group, keep=keep_largest(score, n_keep, group.divisions), total=total))
    return ChannelPlan(ratio=ratio, threshold=threshold, groups=tuple(plans))


def keep_largest(score: torch.Tensor, n_keep: int, divisions: int = 1) -> torch.Tensor:
    """The sorted positions of the `n_keep` largest scores (the same count in each of `divisions`
    equal chunks when > 1)."""
    if divisions > 1:
        return _keep_per_division(score, n_keep, divisions)
    # Largest |γ| first; a stable sort makes ties resolve by position, reproducibly.
    order = torch.sort(score, descending=True, stable=True).indices
    return torch.sort(order[:n_keep]).values


def _keep_per_division(score: torch.Tensor, n_keep: int, divisions: int) -> torch.Tensor:
    """The same count in each of `divisions` equal chunks (rounded up), the largest |γ| of each chunk."""
    size = score.numel() // divisions
    per = min(size, max(1, -(-n_keep // divisions)))
    keep = []
    for d in range(divisions):
        order = torch.sort(score[d * size : (d + 1) * size], descending=True, stable=True).indices
        keep.append(torch.sort(order[:per]).values + d * size)
    return torch.cat(keep)


def plan_masks(modules: dict[str, nn.Module], plan: ChannelPlan
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """By module name (`modules`: the unpruned model's): the output rows each producer keeps, the
    input columns each consumer keeps as a boolean mask (several spaces may share one input), and
    the indices each selection keeps."""
    out_keep: dict[str, torch.Tensor] = {}
    in_mask: dict[str, torch.Tensor] = {}
    selections: dict[str, torch.Tensor] = {}
    slices: dict[str, torch.Tensor] = {}
    for gp in plan.groups:
        if gp.kept == gp.total:
            continue
        group = gp.group
        for name in group.producers:
            out_keep[name] = gp.keep
        for name, offset, width in group.slices:  # a BN over a concatenation: its rows of this space
            rows = slices.setdefault(name, torch.ones(modules[name].num_features, dtype=torch.bool))
            rows[offset:offset + width] = torch.zeros(width, dtype=torch.bool).index_fill_(0, gp.keep, True)
        if group.selection is not None:
            selections[group.selection] = gp.keep
        space = torch.zeros(gp.total, dtype=torch.bool)
        space[gp.keep] = True
        for consumer in group.consumers:
            if consumer.module not in in_mask:
                in_mask[consumer.module] = torch.ones(_in_width(modules[consumer.module]), dtype=torch.bool)
            columns = space.repeat_interleave(consumer.repeat)
            in_mask[consumer.module][consumer.offset : consumer.offset + columns.numel()] = columns
    out_keep.update({name: rows.nonzero().flatten() for name, rows in slices.items()})
    return out_keep, in_mask, selections


def _in_width(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.in_channels
    if isinstance(module, nn.Linear):
        return module.in_features
    raise TypeError(f"a {type(module).__name__} cannot consume channels")
