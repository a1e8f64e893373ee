"""Follow every channel space through a traced graph.

`Walker` visits the nodes of a graph `slimctl.trace.graph.trace_graph` made, in order, and gives
each tensor a *layout*: its channels as a list of segments (`segments.Seg`: a space, its width, the
flags of a removed channel there, columns per channel). One segment after a conv; several after
`cat(dim=1)`. What each op does to a layout comes from the op table (`rules.classify`); the walker
adds what needs the graph's state: which operands are tracked, how many segments reach an op,
unions of spaces (union-find) at residual adds and gates. Anything it cannot follow *freezes* the
spaces it touches, with the reason recorded.
"""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any

from torch import fx, nn

from slimctl.base.groups import Consumer
from slimctl.base.inserted import selection_of
from slimctl.trace.rules import (
    Op,
    OpRule,
    call_counts,
    classify,
    columns_per_channel,
    frozen_bn_note,
    gate_function_op,
    gate_module_op,
    is_bn,
    label,
    shape,
)
from slimctl.trace.segments import Seg, Space, not_constant_note, through

# --- the walk ------------------------------------------------------------------------------------


class Walker:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.calls = call_counts(gm.graph)
        self.spaces: list[Space] = []
        self.parent: list[int] = []
        self.layout: dict[fx.Node, list[Seg] | None] = {}
        self.bn_nodes: list[fx.Node] = []
        self.unranked: dict[str, str] = {}  # BN-like modules that cannot rank (frozen, affine=False) → why

    def rule(self, node: fx.Node) -> OpRule:
        return classify(node, self.modules, self.calls)

    def label(self, node: fx.Node) -> str:
        return label(node, self.modules)

    # union-find
    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def space(self, i: int) -> Space:
        return self.spaces[self.find(i)]

    def new(self, width: int, producer: str | None = None, reason: str | None = None) -> int:
        self.spaces.append(Space(width, producers=[producer] if producer else []))
        self.parent.append(len(self.parent))
        if reason:
            self.spaces[-1].reasons.append(reason)
        return len(self.spaces) - 1

    def union(self, a: int, b: int, residual: bool) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            self.spaces[a].residual |= residual
            return
        sa, sb = self.spaces[a], self.spaces[b]
        for attr in ("producers", "bns", "consumers", "readers", "reasons", "not_constant", "slices"):
            getattr(sa, attr).extend(x for x in getattr(sb, attr) if x not in getattr(sa, attr))
        sa.residual |= sb.residual | residual
        sa.depthwise |= sb.depthwise
        sa.divisions |= sb.divisions
        self.parent[b] = a

    def freeze(self, segs: list[Seg] | None, reason: str) -> None:
        for seg in segs or []:
            sp = self.space(seg.space)
            if reason not in sp.reasons:
                sp.reasons.append(reason)

    # helpers
    def frozen_output(self, node: fx.Node, reason: str) -> list[Seg] | None:
        out = shape(node)
        if out is None or len(out) < 2:
            return None
        return [Seg(self.new(out[1], reason=reason), out[1], False)]

    def tracked(self, value: Any) -> bool:
        return isinstance(value, fx.Node) and self.layout.get(value) is not None

    def input_nodes(self, node: fx.Node) -> list[fx.Node]:
        return [n for n in node.all_input_nodes if self.layout.get(n) is not None]

    def opaque(self, node: fx.Node, desc: str) -> list[Seg] | None:
        for n in self.input_nodes(node):
            self.freeze(self.layout[n], f"read by {desc}")
        return self.frozen_output(node, f"produced by {desc}")

    def single_input(self, node: fx.Node) -> list[Seg] | None:
        first = node.args[0] if node.args else None
        return self.layout.get(first) if isinstance(first, fx.Node) else None

    def inplace_on_shared(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            inplace = getattr(self.modules[node.target], "inplace", False)
        elif node.op == "call_method":
            inplace = node.target.endswith("_") and not node.target.endswith("__")
        else:
            inplace = node.kwargs.get("inplace", False) is True or node.target in (
                operator.iadd, operator.imul, operator.isub, operator.itruediv)
        first = node.args[0] if node.args else None
        return bool(inplace) and isinstance(first, fx.Node) and len(first.users) > 1 and self.tracked(first)

    # the walk
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.layout[node] = self.visit(node)

    def visit(self, node: fx.Node) -> list[Seg] | None:
        if node.op == "placeholder":
            return self.frozen_output(node, "the model's input")
        if node.op == "output":
            for n in node.all_input_nodes:
                self.freeze(self.layout.get(n), "reaches the model's output")
            return None
        if node.op == "get_attr":
            return None
        if self.inplace_on_shared(node):
            return self.opaque(node, f"in-place {self.label(node)} on a value other ops also read")
        rule = self.rule(node)
        if node.op == "call_module":
            return self.visit_module(node, rule)
        return self.visit_function(node, rule)

    def visit_module(self, node: fx.Node, rule: OpRule) -> list[Seg] | None:
        name, m = node.target, self.modules[node.target]
        if rule.op is Op.REUSED:
            if is_bn(m):
                self.bn_nodes.append(node)
            return self.opaque(node, rule.note)
        if frozen_bn_note(m, name) is not None:
            self.unranked[name] = rule.note
        segs = self.single_input(node)
        if segs is None:
            return self.frozen_output(node, f"produced by {self.label(node)}")
        if rule.op is Op.CONSUMER:
            self.consume(name, segs, rule)
            width = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            return [Seg(self.new(width, name), width, False)]
        if rule.op is Op.DEPTHWISE:  # the space passes through
            if len(segs) != 1:
                return self.opaque(node, f"depthwise conv {name!r} over a concatenation")
            sp = self.space(segs[0].space)
            sp.producers.append(name)
            sp.depthwise = True
            return [replace(through(segs[0], rule, self.label(node)), repeat=1)]
        if rule.op is Op.GROUPED:  # equal keep counts per group on both sides
            if len(segs) != 1 or m.out_channels % m.groups:
                return self.opaque(node, f"grouped conv {name!r} over a concatenation")
            self.consume(name, segs, rule)
            self.space(segs[0].space).divisions.add(m.groups)
            out = self.new(m.out_channels, name)
            self.spaces[out].divisions.add(m.groups)
            return [Seg(out, m.out_channels, False)]
        if rule.op is Op.BN:
            return self.visit_bn(node, m, segs)
        if rule.op is Op.SELECTION:
            self.freeze(segs, f"read by ChannelSelection {name!r} (its BN keeps its width)")
            k = m.indices.numel()
            return [Seg(self.new(k, reason=f"selected channels ({name!r})"), k, all(s.zero for s in segs),
                        const=all(s.const for s in segs),
                        why=next((s.why for s in segs if not s.const), ""))]
        if rule.op is Op.PER_CHANNEL:
            return [through(s, rule, self.label(node)) for s in segs]
        if rule.op is Op.FLATTEN:
            return self.flattened(node, segs, *rule.dims)
        return self.opaque(node, rule.note)  # NORM, UNKNOWN

    def visit_bn(self, node: fx.Node, m: nn.BatchNorm2d, segs: list[Seg]) -> list[Seg]:
        name = node.target
        self.bn_nodes.append(node)
        if len(segs) == 1 and segs[0].width == m.num_features:
            sp = self.space(segs[0].space)
            sp.bns.append(name)
            sp.producers.append(name)
        elif sum(seg.width for seg in segs) != m.num_features or any(seg.repeat != 1 for seg in segs):
            for seg in segs:
                self.space(seg.space).readers.append(name)
            self.freeze(segs, f"read by BatchNorm2d {name!r} inside a concatenation")
        else:  # a slice of this BN ranks each space (`grouping.classify_spaces` decides what that means)
            offset = 0
            for seg in segs:
                sp = self.space(seg.space)
                sp.readers.append(name)
                sp.slices.append((name, offset, seg.width))
                offset += seg.width
        # After a BN a removed channel is zero (γ, β zeroed) or the constant β (γ ≈ 0).
        if selection_of(m) is not None:  # an inserted selection
            self.freeze(segs, f"BatchNorm2d {name!r} keeps its width (channel selection)")
            k = selection_of(m).indices.numel()
            return [Seg(self.new(k, reason=f"selected channels of {name!r}"), k, True, const=True, why="")]
        return [replace(s, zero=True, const=True, why="") for s in segs]

    def consume(self, name: str, segs: list[Seg], rule: OpRule | None = None) -> None:
        offset = 0
        for seg in segs:
            if seg.const and rule is not None and not rule.constant:  # the consumer itself (run-time padding)
                seg = replace(seg, const=False, why=rule.note)
            sp = self.space(seg.space)
            sp.consumers.append(Consumer(name, offset, seg.repeat, constant=seg.const, profile=seg.profile,
                                         gate=seg.gate))
            if not seg.zero:
                sp.reasons.append(f"reaches {name!r} without a zeroing BatchNorm2d (no BN after its producer, "
                                  "or a Sigmoid-like op on the way)")
            if not seg.const and seg.gate is None:
                sp.not_constant.append(not_constant_note(name, seg.why))
            offset += seg.width * seg.repeat

    def flattened(self, node: fx.Node, segs: list[Seg], start: int = 1, end: int = -1) -> list[Seg] | None:
        in_shape, out_shape = shape(node.args[0]), shape(node)
        if in_shape is None or out_shape is None:
            return None
        columns = columns_per_channel(in_shape, out_shape, start, end)
        if columns is None:
            return self.opaque(node, f"{self.label(node)} reshaping the channel dimension")
        return segs if columns == 1 else [replace(s, repeat=s.repeat * columns) for s in segs]

    def visit_function(self, node: fx.Node, rule: OpRule) -> list[Seg] | None:
        if rule.op is Op.NEUTRAL:
            return None
        if rule.op is Op.ADD:
            return self.combine(node, residual=True)
        if rule.op is Op.MUL:
            return self.combine(node, residual=False)
        if rule.op is Op.CAT:
            return self.concat(node)
        segs = self.single_input(node)
        if rule.op is Op.DIV:
            if segs is not None and not any(self.tracked(a) for a in node.args[1:]):
                varying = [a for a in node.args[1:] if self.varies(a, len(shape(node) or ()))]
                if varying:  # a divisor that varies over space: the quotient of a constant is not constant
                    return [replace(s, const=False, why=s.why if not s.const else
                                    f"{self.label(node)} by a tensor that varies over space") for s in segs]
                return segs
            return self.opaque(node, self.label(node))
        if not self.input_nodes(node):
            return self.frozen_output(node, f"produced by {self.label(node)}") if segs is None else None
        if segs is None:
            return self.opaque(node, self.label(node))
        if rule.op is Op.PER_CHANNEL:
            return [through(s, rule, self.label(node)) for s in segs]
        if rule.op is Op.FLATTEN:
            return self.flattened(node, segs, *rule.dims)
        if rule.op is Op.REDUCE:  # a removed channel's zeros / constant average to the same
            return [s if not (s.profile or s.gate) else
                    replace(s, const=False, gate=None, profile=(), why=s.why if s.gate else
                            f"{self.label(node)} of a zero-padded average pool's output (its value depends on the size)")
                    for s in segs]
        return self.opaque(node, rule.note)

    @staticmethod
    def varies(value: Any, ndim: int) -> bool:
        """An untracked tensor operand that is not constant over batch and space (per channel it
        may differ): a constant channel combined with it is no longer constant."""
        s = shape(value)
        if s is None or ndim < 2:
            return False
        s = (1,) * (ndim - len(s)) + s  # broadcast from the right
        return any(d != 1 for i, d in enumerate(s[-ndim:]) if i != 1)

    def concat(self, node: fx.Node) -> list[Seg] | None:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        out = shape(node)
        if out is None or dim % len(out) != 1:
            return self.opaque(node, f"cat on dim {dim} ({node.name})")
        segs: list[Seg] = []
        for t in tensors:
            if not self.tracked(t):
                return self.opaque(node, f"cat of an untracked value ({node.name})")
            segs += self.layout[t]
        return segs

    def combine(self, node: fx.Node, residual: bool) -> list[Seg] | None:
        """add/sub (residual coupling) and mul (an SE gate: the gate's space is x's)."""
        out_shape = shape(node)
        if out_shape is None or len(out_shape) < 2:
            return self.opaque(node, self.label(node)) if self.input_nodes(node) else None
        c = out_shape[1]
        full, full_nodes, others, scalar_nonzero, varying = [], [], [], False, False
        for a in list(node.args) + list(node.kwargs.values()):
            a_shape = shape(a)
            if self.tracked(a) and a_shape and len(a_shape) >= 2 and a_shape[1] == c:
                full.append(self.layout[a])
                full_nodes.append(a)
            elif self.tracked(a):  # broadcast over channels
                others.append(self.layout[a])
            elif isinstance(a, (int, float)) and a != 0:
                scalar_nonzero = True
            elif isinstance(a, fx.Node) and a_shape is not None:  # a constant tensor (a buffer, …)
                scalar_nonzero = True
                varying |= self.varies(a, len(out_shape))
        if not full:
            return self.opaque(node, self.label(node))
        widths = [s.width for s in full[0]]
        if any([s.width for s in segs] != widths for segs in full[1:]):
            for segs in full:
                self.freeze(segs, f"{self.label(node)} joins differently concatenated tensors")
            return self.frozen_output(node, f"produced by {self.label(node)}")
        for segs in full[1:]:
            for a, b in zip(full[0], segs):
                self.union(a.space, b.space, residual)
        other_zero = [all(s.zero for s in segs) for segs in others]
        others_const = all(s.const and not s.profile for segs in others for s in segs)
        # x · act(fc(…)): the gate of a squeeze-and-excitation block, if one operand is one
        gates = [None if residual or len(full) != 2 else self.gate_chain(n) for n in full_nodes]
        out = []
        for i, s in enumerate(full[0]):
            zeros = [segs[i].zero for segs in full]
            if residual:  # a + b: zero only if every operand is
                zero = all(zeros) and all(other_zero) and not scalar_nonzero
            else:  # a * b: zero if any operand is
                zero = any(zeros) or any(other_zero)
            out.append(replace(self.combined([segs[i] for segs in full], gates, others_const, varying, residual, node),
                               space=s.space, width=s.width, zero=zero, repeat=s.repeat))
        return out

    def combined(self, segs: list[Seg], gates: list, others_const: bool, varying: bool, residual: bool,
                 node: fx.Node) -> Seg:
        """The constant-related flags of one segment of a + b or a · b (`segs`: the operands' segments
        there; `gates`: per operand, the gate it is, if any; `others_const`: the operands broadcast
        over channels are constant; `varying`: an untracked operand varies over space). a + b and
        a · b are constant only if every operand is (one profile, and for a sum only); a constant
        times a gate is a gated constant."""
        base = segs[0]
        consts = [x.const for x in segs]
        other_const = others_const and not varying
        if all(consts) and other_const and len({x.profile for x in segs}) == 1 and (residual or not base.profile):
            return replace(base, const=True, why="", gate=None)
        if not residual and len(segs) == 2 and other_const:
            for k in (0, 1):  # segs[k] the constant, segs[1 - k] the gate
                if segs[k].const and not segs[k].profile and gates[1 - k] is not None and not segs[1 - k].const:
                    return replace(segs[k], const=False, gate=gates[1 - k],
                                   why=f"{self.label(node)} by an input-dependent factor")
        if not any(consts):
            why = base.why
        elif all(consts) and varying and others_const:
            why = f"{self.label(node)} with a tensor that varies over space"
        elif all(consts) and other_const:
            why = f"{self.label(node)} of constants after zero-padded average pools"
        else:
            why = f"{self.label(node)} " + ("with a non-constant operand" if residual else "by an input-dependent factor")
        return replace(base, const=False, why=why, gate=None, profile=())

    def gate_chain(self, node: fx.Node) -> tuple[str, tuple[tuple[str, float, float], ...]] | None:
        """(the layer computing a gate's logits, the elementwise ops after it in order) when `node` is
        act(…(layer(h))) through ops `slimctl.base.gates.GATE_OPS` knows (and reshapes that keep the
        channels); else None. The layer is a groups=1 Conv2d or a Linear, called once."""
        ops: list[tuple[str, float, float]] = []
        while isinstance(node, fx.Node):
            if node.op == "call_module":
                m = self.modules[node.target]
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    plain = isinstance(m, nn.Linear) or m.groups == 1 and self.rule(node).op is Op.CONSUMER
                    return (node.target, tuple(reversed(ops))) if plain and self.calls[node.target] == 1 else None
                op = gate_module_op(m)
            elif node.op in ("call_function", "call_method"):
                op = gate_function_op(node, self.modules)
            else:
                return None
            if op is None:
                return None
            if op[0] != "same":
                ops.append(op)
            inputs = [a for a in node.args if isinstance(a, fx.Node)]
            if len(inputs) != 1 or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
                return None
            node = inputs[0]
        return None
