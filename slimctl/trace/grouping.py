"""From walked spaces to channel groups: kinds, selection groups, and why the rest keeps its width.

Each space the walker found gets a kind: `free` / `depthwise` / `grouped` / `coupled` spaces shrink
(one `ChannelGroup` each, ranked by |γ| of every BN over the space, reduced with max — or with the
`coupled` reduction for residual sets); a `coupled` set with `coupled="keep"` and every `frozen`
space keeps its width. A BN over a space that keeps its width, whose output reaches only groups=1
convs / Linears through zero-preserving per-channel ops, becomes a *selection* group (the paper's
channel selection): it keeps its width and its consumers read only the kept channels. Selection
detection follows the BN's output by the walker's op table (`rules.classify`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import fx, nn

from slimctl.errors import SlimctlError
from slimctl.base.groups import ChannelGroup, Consumer, slice_name
from slimctl.base.inserted import SELECT, insert_selections, selection_of
from slimctl.trace.rules import Op, columns_per_channel, shape
from slimctl.trace.segments import Seg, not_constant_note, through
from slimctl.trace.walk import Walker


@dataclass(frozen=True)
class SpaceInfo:
    """One channel space, for `slimctl groups --explain`."""

    kind: str  # free | depthwise | grouped | coupled | selection | frozen
    width: int
    members: tuple[str, ...]  # every module whose channels are (or read) this space
    bns: tuple[str, ...]  # the BNs that rank it
    reason: str | None = None  # why a frozen space (or a kept coupled set) keeps its width
    pruned: bool = False  # whether a group shrinks it (or, for selection, its consumers)
    # Pruned spaces: each consumer that a removed channel reaches as a non-constant, and the op that
    # made it vary (β compensation cannot replace that channel there).
    not_constant: tuple[str, ...] = ()


@dataclass
class TraceResult:
    groups: list[ChannelGroup]
    spaces: list[SpaceInfo]
    selections: tuple[str, ...] = ()  # BNs that need a ChannelSelection inserted (`prepare`)
    frozen_bns: dict[str, str] = field(default_factory=dict)  # BN → why no group ranks it

    def prepare(self, model: nn.Module) -> nn.Module:
        """Insert the ChannelSelection modules the selection groups name (in place; idempotent)."""
        insert_selections(model, self.selections)
        return model


def space_rows(result: TraceResult) -> list[dict]:
    """JSON-able rows of `result.spaces` (for `slimctl groups --explain`)."""
    return [
        {"kind": s.kind, "width": s.width, "bns": list(s.bns), "members": list(s.members),
         "pruned": s.pruned, "reason": s.reason, "constant_note": "; ".join(s.not_constant) or None}
        for s in result.spaces
    ]


def classify_spaces(w: Walker, coupled: str) -> TraceResult:
    """The groups, space kinds, selections and frozen BNs of a finished walk."""
    groups: list[ChannelGroup] = []
    spaces: list[SpaceInfo] = []
    roots = sorted({w.find(i) for i in range(len(w.spaces))})
    for root in roots:
        sp = w.spaces[root]
        reasons = list(sp.reasons)
        if coupled == "keep":  # its readers select from it instead (the paper's DenseNet)
            reasons += [f"read by BatchNorm2d {name!r} inside a concatenation" for name, *_ in sp.slices]
        if not reasons and not sp.bns and not sp.slices:
            reasons.append("no BatchNorm2d ranks it")
        if not reasons and not any(isinstance(w.modules[p], (nn.Conv2d, nn.Linear)) and p not in sp.bns
                                   for p in sp.producers):
            reasons.append("no conv or Linear produces it")
        if not reasons and len(sp.divisions) > 1:
            reasons.append(f"read by grouped convs with different group counts {sorted(sp.divisions)}")
        divisions = next(iter(sp.divisions), 1)
        if not reasons and sp.width % divisions:
            reasons.append(f"width {sp.width} is not a multiple of {divisions} groups")
        members = tuple(dict.fromkeys([*sp.producers, *(c.module for c in sp.consumers), *sp.readers]))
        if reasons:
            spaces.append(SpaceInfo("frozen", sp.width, members, tuple(sp.bns), "; ".join(dict.fromkeys(reasons))))
            continue
        if sp.residual and coupled == "keep":
            spaces.append(SpaceInfo("coupled", sp.width, members, tuple(sp.bns),
                                    "residual-coupled set, kept (coupled='keep', as in the paper)"))
            continue
        # A concatenated space (read by BNs inside concatenations) is pruned at its producer, every
        # reading BN losing the removed channels at its offset: coupled, like a residual set.
        joint = sp.residual or bool(sp.slices)
        kind = "coupled" if joint else "grouped" if divisions > 1 else \
            "depthwise" if sp.depthwise or len(sp.bns) > 1 else "free"
        slices = tuple(dict.fromkeys(sp.slices))
        names = tuple(slice_name(*s) for s in slices)
        groups.append(ChannelGroup(
            bn=sp.bns[0] if sp.bns else names[0], producers=tuple(dict.fromkeys(sp.producers)),
            consumers=tuple(dict.fromkeys(sp.consumers)), extra_bns=tuple(sp.bns[1:]),
            reduce=coupled if joint else "max", divisions=divisions, coupled=joint, slices=slices,
            bn_is_slice=not sp.bns,
        ))
        spaces.append(SpaceInfo(kind, sp.width, members, (*sp.bns, *names), pruned=True,
                                not_constant=tuple(dict.fromkeys(sp.not_constant))))

    # BNs that rank a concatenated space by a slice keep no selection of their own.
    grouped_bns = {b for g in groups for b in g.ranking_bns}
    to_insert = []
    for node in w.bn_nodes:
        name = node.target
        if name in grouped_bns:
            continue
        found = find_selection(w, node)
        if found is None:
            continue
        selection, consumers, existing, notes = found
        if not existing:
            to_insert.append(name)
        groups.append(ChannelGroup(bn=name, consumers=tuple(consumers), selection=selection))
        spaces.append(SpaceInfo("selection", w.modules[name].num_features,
                                (name, selection, *(c.module for c in consumers)), (name,),
                                "its space keeps its width; its consumers read the kept channels", pruned=True,
                                not_constant=tuple(dict.fromkeys(notes))))
    ranked = grouped_bns | {g.bn for g in groups}
    frozen_bns = {}
    for node in w.bn_nodes:
        if node.target not in ranked:
            reasons = dict.fromkeys(r for seg in w.layout.get(node.args[0]) or [] for r in w.space(seg.space).reasons)
            frozen_bns[node.target] = "; ".join(reasons) or "its space keeps its width (residual-coupled)" \
                " and its output is not read by convs/Linears only"
    frozen_bns.update(w.unranked)
    if not groups:
        frozen = [s.reason for s in spaces if s.reason][:3]
        raise SlimctlError(
            "no prunable channel group found in the traced graph"
            + (f" (e.g. {'; '.join(frozen)})" if frozen else "")
            + "; declare channel_groups() by hand"
        )
    return TraceResult(groups=groups, spaces=spaces, selections=tuple(to_insert), frozen_bns=frozen_bns)


def find_selection(w: Walker, bn_node: fx.Node) -> tuple[str, list[Consumer], bool, list[str]] | None:
    """(selection name, consumers, selection exists, non-constant notes) when the BN's output reaches
    only groups=1 convs / Linears through zero-preserving per-channel ops, flattens and spatial
    reductions (the op table's kinds, with the walker's shape checks); else None."""
    name = bn_node.target
    bn = w.modules[name]
    if w.calls[name] > 1:
        return None
    start, existing = bn_node, True
    if selection_of(bn) is not None:
        selection = f"{name}.{SELECT}"
    elif len(bn_node.users) == 1 and next(iter(bn_node.users)).op == "call_module" and \
            w.rule(next(iter(bn_node.users))).op is Op.SELECTION:
        start = next(iter(bn_node.users))
        selection = start.target
    else:
        selection, existing = f"{name}.{SELECT}", False
    consumers: list[Consumer] = []
    notes: list[str] = []
    # (node, a removed channel there: columns per channel, constant or the op that made it vary, profile)
    stack: list[tuple[fx.Node, Seg]] = [(start, Seg(-1, 0, True, const=True, why=""))]
    while stack:
        node, seg = stack.pop()
        if not node.users:
            return None
        for user in node.users:
            if user.op not in ("call_module", "call_function", "call_method"):
                return None
            if [a for a in user.all_input_nodes if w.layout.get(a) is not None] != [node] or user.args[0] is not node:
                return None
            rule = w.rule(user)
            if rule.op is Op.CONSUMER and (seg.repeat == 1 or isinstance(w.modules[user.target], nn.Linear)):
                consumers.append(Consumer(user.target, 0, seg.repeat, constant=seg.const, profile=seg.profile))
                if not seg.const:
                    notes.append(not_constant_note(user.target, seg.why))
            elif rule.op is Op.PER_CHANNEL and rule.zero:
                stack.append((user, through(seg, rule, w.label(user))))
            elif rule.op is Op.FLATTEN:
                in_shape, out_shape = shape(node), shape(user)
                columns = columns_per_channel(in_shape, out_shape, *rule.dims) if in_shape and out_shape else None
                if columns is None:
                    return None
                stack.append((user, replace(seg, repeat=seg.repeat * columns)))
            elif rule.op is Op.REDUCE:
                stack.append((user, seg if not seg.profile else replace(
                    seg, const=False, profile=(), why=f"{w.label(user)} of a zero-padded average pool's output")))
            else:
                return None
    return (selection, consumers, existing, notes) if consumers else None
