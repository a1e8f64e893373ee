"""The vocabulary of pruning: channel groups and their consumers (plain data, no behaviour).

A *channel group* is one channel space of the network, ranked by the |γ| of one BatchNorm:
- `producers` are modules whose output channels are the space (the conv before the BN, the BN);
- `consumers` are modules whose input channels are the space (the next conv, or the Linear head),
  possibly at an `offset` inside a concatenation and with `repeat` input columns per channel
  (flatten → Linear);
- `selection` names a ChannelSelection module when the BN itself must keep its width (it sits on a
  stream other layers read whole): then only the consumers read the kept channels, through the
  selection's index buffer.

A family declares its groups (`model.channel_groups()`); the tracer derives them for any other CNN
(`slimctl.trace.channel_groups`). Both feed the same plan (`slimctl.core.plan`) and the same surgery.
"""

from __future__ import annotations

from dataclasses import dataclass

REDUCTIONS = ("max", "mean", "sum")
# Residual-coupled spaces (traced models): kept, as in the paper, or pruned together by a reduction.
COUPLED_MODES = ("keep", *REDUCTIONS)


@dataclass(frozen=True)
class Consumer:
    module: str
    offset: int = 0  # first input channel of the space in `module`'s input (concatenations)
    repeat: int = 1  # input columns per channel (flatten → Linear: H·W of the flattened map)
    # Whether a removed channel reaches this consumer as a constant (its BN emits β once γ ≈ 0, and
    # only constant-preserving ops lie between): then pruning can add that constant's response.
    constant: bool = True
    # Stride-1 average pools that count zero padding, met on the way (each (kh, kw, ph, pw)): the
    # constant arrives as c·P, P the pools applied to an all-ones map (smaller near the borders).
    profile: tuple[tuple[int, int, int, int], ...] = ()
    # An input-dependent gate met on the way (squeeze-and-excitation: x · act(fc(…))): the removed
    # channel arrives as c·g(x) (then `constant` is False). (module name of the layer computing the
    # gate's logits, its elementwise ops in order as (op, a, b); see `slimctl.base.gates.GATE_OPS`).
    gate: tuple[str, tuple[tuple[str, float, float], ...]] | None = None


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
    # A concatenated space pruned at its producer (`coupled` modes, DenseNet): the BNs that read it
    # inside a concatenation, as (BN, offset of the space's first channel there, the space's width).
    # They rank it beside the full-width BNs (`reduce` over all), and each loses the removed channels
    # at its offset. A space no full-width BN ranks has `bn_is_slice`: `bn` is then only its name,
    # "<first slice's BN>[start:end]".
    slices: tuple[tuple[str, int, int], ...] = ()
    bn_is_slice: bool = False

    @property
    def bns(self) -> tuple[str, ...]:
        """Every full-width BN whose |γ| ranks this group (the first is `bn`, unless that names a slice)."""
        return self.extra_bns if self.bn_is_slice else (self.bn, *self.extra_bns)

    @property
    def ranking_bns(self) -> tuple[str, ...]:
        """Every BN module whose |γ| ranks some of this group: `bns`, then the BNs of `slices`."""
        return tuple(dict.fromkeys((*self.bns, *(name for name, *_ in self.slices))))


def slice_name(bn: str, offset: int, width: int) -> str:
    """`bn[offset:offset + width]`: the name of a group that only a slice of BNs ranks."""
    return f"{bn}[{offset}:{offset + width}]"


def ranked_bns(groups: list[ChannelGroup]) -> list[str]:
    """Every BN module that ranks some group, once each, in order: what sparse training regularizes."""
    return list(dict.fromkeys(bn for g in groups for bn in g.ranking_bns))
