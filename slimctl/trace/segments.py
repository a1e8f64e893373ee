"""What the walk knows about channels: spaces (sets of channels pruned together) and segments
(some channels of a tensor, with what a removed channel is there: zero, constant, c·P, c·g(x)).

`through` is the one rule for a per-channel op, shared by the walk (`slimctl.trace.walk`) and
selection detection (`slimctl.trace.grouping`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from slimctl.base.groups import Consumer
from slimctl.trace.rules import OpRule

# --- spaces and segments -------------------------------------------------------------------------


@dataclass
class Space:
    width: int
    producers: list[str] = field(default_factory=list)
    bns: list[str] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)  # other members (for --explain)
    reasons: list[str] = field(default_factory=list)  # why it is frozen
    # BNs reading it inside a concatenation: (BN, offset there, width). With coupled="keep" such a
    # space keeps its width (its readers select from it); else it is pruned at its producer.
    slices: list[tuple[str, int, int]] = field(default_factory=list)
    not_constant: list[str] = field(default_factory=list)  # consumers reached non-constantly, and why
    residual: bool = False
    depthwise: bool = False
    divisions: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Seg:
    """Some channels of a tensor: `width` channels of one space, and what a removed one is here."""

    space: int
    width: int
    zero: bool  # exactly zero in the γ/β-zeroed reference: pruning is exact
    repeat: int = 1  # columns per channel (after flatten)
    const: bool = False  # constant over batch and space once γ ≈ 0 (its BN emits β): β compensation works
    why: str = "its producer, with no BatchNorm2d after it"  # when not const: the op that made it vary
    # const: the zero-padded stride-1 average pools met since the BN (the constant is c·P there)
    profile: tuple[tuple[int, int, int, int], ...] = ()
    # not const, but c·g(x) for an input-dependent gate g (Consumer.gate): compensable all the same
    gate: tuple[str, tuple[tuple[str, float, float], ...]] | None = None


def not_constant_note(consumer: str, why: str) -> str:
    """`--explain`'s line for a consumer that reads a removed channel as a non-constant."""
    return f"{consumer!r} reads it through {why}: no β compensation"


def through(seg: Seg, rule: OpRule, what: str) -> Seg:
    """`seg` after the per-channel op `what`: zero and constant only if the op preserves them. A
    constant's profile (c·P) or gate (c·g(x)) passes identities only; a padded pool adds to the profile."""
    zero = seg.zero and rule.zero
    if rule.identity:
        return replace(seg, zero=zero)
    if seg.gate is not None:
        return replace(seg, zero=zero, gate=None)
    if not seg.const:
        return replace(seg, zero=zero)
    if rule.profile is not None:
        return replace(seg, zero=zero, profile=seg.profile + (rule.profile,))
    if not rule.constant:
        return replace(seg, zero=zero, const=False, profile=(), why=rule.note)
    if seg.profile:  # f(c·P) is not a multiple of P for an activation, nor for another pool's borders
        return replace(seg, zero=zero, const=False, profile=(), why=f"{what} after a zero-padded average pool")
    return replace(seg, zero=zero)
