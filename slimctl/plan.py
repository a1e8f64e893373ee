"""Channel groups and the channel plan: which channels of which layers survive pruning.

A *channel group* is one channel space of the network, ranked by the |γ| of one BatchNorm:
- `producers` are modules whose output channels are the space (the conv before the BN, the BN);
- `consumers` are modules whose input channels are the space (the next conv, or the Linear head),
  possibly at an `offset` inside a concatenation and with `repeat` input columns per channel
  (flatten → Linear);
- `selection` names a ChannelSelection module when the BN itself must keep its width (it sits on a
  stream other layers read whole): then only the consumers read the kept channels, through the
  selection's index buffer.

A family declares its groups (`model.channel_groups()`); `make_plan` turns them and a ratio into
kept indices with the paper's single global threshold; `slimctl.surgery` applies the plan. Both are
family-agnostic: a traced model's groups feed the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimctl.config import validate_ratio
from slimctl.errors import SlimctlError


@dataclass(frozen=True)
class Consumer:
    module: str
    offset: int = 0  # first input channel of the space in `module`'s input (concatenations)
    repeat: int = 1  # input columns per channel (flatten → Linear: H·W of the flattened map)


REDUCTIONS = ("max", "mean", "sum")
# Residual-coupled spaces (traced models): kept, as in the paper, or pruned together by a reduction.
COUPLED_MODES = ("keep", *REDUCTIONS)


@dataclass(frozen=True)
class ChannelGroup:
    bn: str
    producers: tuple[str, ...] = ()
    consumers: tuple[Consumer, ...] = ()
    selection: str | None = None
    # A space ranked by several BNs (a depthwise chain, a residual-coupled set): the other BNs, all
    # of the space's width and also listed in `producers`; a channel's score is `reduce` over the |γ|s.
    extra_bns: tuple[str, ...] = ()
    reduce: str = "max"
    # Grouped convolutions read the space in `divisions` equal contiguous chunks: each chunk keeps
    # the same number of channels (which ones may differ per chunk).
    divisions: int = 1
    coupled: bool = False  # a residual-coupled set (several streams that must keep the same channels)

    @property
    def bns(self) -> tuple[str, ...]:
        """Every BN whose |γ| ranks this group (the first is `bn`)."""
        return (self.bn, *self.extra_bns)


@dataclass(frozen=True)
class GroupPlan:
    group: ChannelGroup
    keep: torch.Tensor  # sorted int64 positions (within the group's current space) that survive
    total: int  # the space's width before this prune

    @property
    def kept(self) -> int:
        return int(self.keep.numel())


@dataclass(frozen=True)
class ChannelPlan:
    ratio: float
    threshold: float | None  # None at ratio 0: nothing is removed
    groups: tuple[GroupPlan, ...]

    def layers(self) -> list[dict]:
        """Per ranked BN: {name, kept, total} (the JSON/table view)."""
        return [{"name": g.group.bn, "kept": g.kept, "total": g.total} for g in self.groups]

    @property
    def kept(self) -> int:
        return sum(g.kept for g in self.groups)

    @property
    def total(self) -> int:
        return sum(g.total for g in self.groups)


def channel_groups(model: nn.Module, *, coupled: str = "keep") -> list[ChannelGroup]:
    """The groups a model declares, or else the groups its torch.fx graph implies.

    A traced model gets ChannelSelection children inserted on its selection BNs (in place,
    idempotent). `coupled` (traced models only): keep residual-coupled spaces (the paper), or prune
    each coupled set together ranked by the max / mean / sum of its BNs' |γ|.
    """
    declare = getattr(model, "channel_groups", None)
    if declare is not None:
        return list(declare())
    result = trace_model(model, coupled=coupled)
    result.prepare(model)
    return result.groups


def trace_model(model: nn.Module, *, coupled: str = "keep"):
    """`trace.derive_groups` at the model's recorded input size, on its device (model unchanged)."""
    from slimctl.trace import derive_groups

    size = getattr(model, "arch_spec", {}).get("input_size", (3, 224, 224))
    device = next(iter(model.parameters())).device
    # Batch 2: BatchNorm in train mode (the trace runs in train mode) needs more than one value.
    return derive_groups(model, torch.zeros(2, *size, device=device), coupled=coupled)


def group_scores(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """|γ| of the group's current channels (for a selection group: only the still-selected ones)."""
    gamma = model.get_submodule(group.bn).weight.detach().abs().float().cpu()
    if group.extra_bns:
        if group.reduce not in REDUCTIONS:
            raise SlimctlError(f"unknown score reduction {group.reduce!r}; use one of {', '.join(REDUCTIONS)}")
        extra = [model.get_submodule(n).weight.detach().abs().float().cpu() for n in group.extra_bns]
        stacked = torch.stack([gamma, *extra])
        gamma = {"max": stacked.amax(0), "mean": stacked.mean(0), "sum": stacked.sum(0)}[group.reduce]
    if group.selection is not None:
        gamma = gamma[model.get_submodule(group.selection).indices.cpu()]
    return gamma


def global_threshold(scores: torch.Tensor, ratio: float) -> float | None:
    """The paper's rule: sort all |γ|, take the value at index int(total·ratio); keep |γ| > it.

    At ratio 0 nothing is removed (the literal rule would still drop the smallest channel).
    """
    if ratio == 0:
        return None
    ordered = torch.sort(scores).values
    return float(ordered[int(scores.numel() * ratio)])


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
        if group.divisions > 1:
            keep = _keep_per_division(score, n_keep, group.divisions)
        else:
            # Largest |γ| first; a stable sort makes ties resolve by position, reproducibly.
            order = torch.sort(score, descending=True, stable=True).indices
            keep = torch.sort(order[:n_keep]).values
        plans.append(GroupPlan(group=group, keep=keep, total=total))
    return ChannelPlan(ratio=ratio, threshold=threshold, groups=tuple(plans))


def _keep_per_division(score: torch.Tensor, n_keep: int, divisions: int) -> torch.Tensor:
    """The same count in each of `divisions` equal chunks (rounded up), the largest |γ| of each chunk."""
    size = score.numel() // divisions
    per = min(size, max(1, -(-n_keep // divisions)))
    keep = []
    for d in range(divisions):
        order = torch.sort(score[d * size : (d + 1) * size], descending=True, stable=True).indices
        keep.append(torch.sort(order[:per]).values + d * size)
    return torch.cat(keep)
