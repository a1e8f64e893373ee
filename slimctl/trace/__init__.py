"""Derive channel groups for any CNN from its torch.fx graph (docs/design.md, "Traced groups").

`derive_groups(model, example_input)` traces the model (train mode, so auxiliary heads are in the
graph), propagates shapes, and follows every channel space through the graph:

- a tensor's channels are a list of *segments* (space, width, flags, columns per channel): one
  segment after a conv, several after `cat(dim=1)`;
- conv (groups=1) / Linear consume their input segments (at an offset, with `repeat` columns per
  channel after a flatten) and produce a new space; BN, depthwise convs and per-channel ops pass
  the space on; a residual add or an SE gate product unites spaces (union-find);
- anything the rules cannot follow (split, transpose, view with other sizes, LayerNorm, unknown
  ops, the model's input and outputs, parameterised modules called twice, in-place ops on shared
  values) *freezes* the spaces it touches, with the reason recorded.

The package, top-down:

- `rules`: the op table — for any fx node, what kind of op it is and whether it keeps a removed
  channel zero / constant. The walk and selection detection both dispatch on it.
- `graph`: tracing (`trace_graph`): the fx graph with every node's shape.
- `segments`: spaces and segments, and `through` (a per-channel op's effect on a removed channel).
- `walk`: the walk over the graph's spaces and segments (`Walker`).
- `grouping`: spaces → kinds and `ChannelGroup`s, selection groups, frozen BNs, refusals.

A segment's two flags: *zero* — a removed channel is exactly zero wherever a consumer reads it (its
BN's γ and β zeroed), the equivalence the tests pin: a space reaching a consumer before its BN or
through Sigmoid-like ops (f(0) ≠ 0) cannot shrink; *constant* — with γ ≈ 0 the BN emits the constant
β for a removed channel, and if only constant-preserving ops lie between, the consumer reads a
constant it can fold in (`Consumer.constant`; `SpaceInfo.not_constant` says where that fails).

Selection in torchvision models: they have no `ChannelSelection` modules, so one is inserted into
the BN (`slimctl.base.inserted`). `derive_groups` never changes the model: call
`TraceResult.prepare(model)` before planning (`channel_groups` does).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from slimctl.errors import SlimctlError
from slimctl.base.groups import COUPLED_MODES, ChannelGroup
from slimctl.base.registry import input_size
from slimctl.trace.grouping import SpaceInfo, TraceResult, classify_spaces, space_rows
from slimctl.trace.rules import NORMS, frozen_bn_note, is_bn
from slimctl.trace.graph import trace_graph
from slimctl.trace.walk import Walker

__all__ = ["SpaceInfo", "TraceResult", "channel_groups", "derive_groups", "space_rows", "trace_model"]


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


def trace_model(model: nn.Module, *, coupled: str = "keep") -> TraceResult:
    """`derive_groups` at the model's input size (`registry.input_size`), on its device (model unchanged)."""
    device = next(iter(model.parameters())).device
    # Batch 2: BatchNorm in train mode (the trace runs in train mode) needs more than one value.
    return derive_groups(model, torch.zeros(2, *input_size(model), device=device), coupled=coupled)


def derive_groups(model: nn.Module, example_input: torch.Tensor, *, coupled: str = "keep") -> TraceResult:
    """Channel groups of `model` from its fx graph (the model is not changed; see TraceResult.prepare)."""
    if coupled not in COUPLED_MODES:
        raise SlimctlError(f"coupled must be one of {', '.join(COUPLED_MODES)}, got {coupled!r}")
    bns = [n for n, m in model.named_modules() if is_bn(m) and frozen_bn_note(m, n) is None]
    if not bns:
        frozen = [note for n, m in model.named_modules() if (note := frozen_bn_note(m, n)) is not None]
        if frozen:
            raise SlimctlError(f"{type(model).__name__} has no trainable BatchNorm2d: {frozen[0]}"
                               + (f" (and {len(frozen) - 1} more)" if len(frozen) > 1 else ""))
        norms = [f"{type(m).__name__} {n!r}" for n, m in model.named_modules() if isinstance(m, NORMS)]
        found = f" (its norms: {', '.join(norms[:3])}{', …' if len(norms) > 3 else ''})" if norms else ""
        raise SlimctlError(
            f"{type(model).__name__} has no BatchNorm2d{found}: network slimming ranks channels by BN scale, "
            "so it cannot slim this model"
        )
    work = copy.deepcopy(model).train()  # aux heads exist only in train mode; ShapeProp updates BN stats
    walker = Walker(trace_graph(work, example_input.detach().to(next(iter(work.parameters())).device)))
    walker.run()
    return classify_spaces(walker, coupled)
