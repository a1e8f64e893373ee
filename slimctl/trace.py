"""Derive channel groups for any CNN from its torch.fx graph (docs/design.md, "Traced groups").

`derive_groups(model, example_input)` traces the model (train mode, so auxiliary heads are in the
graph), propagates shapes, and follows every channel space through the graph:

- a tensor's channels are a list of *segments* (space, width, zeroed?, columns per channel): one
  segment after a conv, several after `cat(dim=1)`;
- conv (groups=1) / Linear consume their input segments (at an offset, with `repeat` columns per
  channel after a flatten) and produce a new space; BN, depthwise convs and per-channel ops pass
  the space on; a residual add or an SE gate product unites spaces (union-find);
- anything the rules cannot follow (split, transpose, view with other sizes, LayerNorm, unknown
  ops, the model's input and outputs, parameterised modules called twice, in-place ops on shared
  values) *freezes* the spaces it touches, with the reason recorded.

Each space then gets a kind: `free` / `depthwise` / `grouped` / `coupled` spaces shrink (one
`ChannelGroup` each, ranked by |γ| of every BN over the space, reduced with max — or with the
`coupled` reduction for residual sets); a `coupled` set with `coupled="keep"` and every `frozen` space
keeps its width. A BN over a space that keeps its width, whose output reaches only groups=1 convs /
Linears through zero-preserving per-channel ops, becomes a *selection* group (the paper's channel
selection): it keeps its width and its consumers read only the kept channels.

"Zeroed?" tracks the equivalence the tests pin: a removed channel must be exactly zero wherever a
consumer reads it (its BN's γ and β zeroed), so a space reaching a consumer before its BN or through
Sigmoid-like ops (f(0) ≠ 0) cannot shrink.

Selection in torchvision models: they have no `ChannelSelection` modules, so one is inserted into
the BN (`slimctl.inserted`). `derive_groups` never changes the model: call
`TraceResult.prepare(model)` before planning (`channel_groups` does).
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F

from slimctl.errors import SlimctlError
from slimctl.groups import COUPLED_MODES, ChannelGroup, Consumer
from slimctl.inserted import SELECT, ChannelSelection, insert_selections, selection_of
from slimctl.registry import input_size

# Per-channel modules/functions that map 0 to 0 (a zeroed channel stays zero) ...
_ZERO_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.Tanh, nn.Hardtanh,
    nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, ChannelSelection,
)
# ... and those that do not (they pass channels through, but a zeroed channel is not zero after them).
_NONZERO_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
_ZERO_FUNCS = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "gelu", "silu",
    "hardswish", "mish", "tanh", "dropout", "dropout2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
    "adaptive_max_pool2d", "contiguous", "clone", "stochastic_depth", "detach",
}
_NONZERO_FUNCS = {"sigmoid", "sigmoid_", "hardsigmoid", "softplus", "exp"}
_NEUTRAL_FUNCS = {"size", "dim", "getattr", "numel", "_assert", "is_scripting"}
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d, nn.BatchNorm1d, nn.BatchNorm3d, nn.LocalResponseNorm)
_ADD = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, "add", "add_", "sub", "sub_"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}


@dataclass(frozen=True)
class SpaceInfo:
    """One channel space, for `slimctl groups --explain`."""

    kind: str  # free | depthwise | grouped | coupled | selection | frozen
    width: int
    members: tuple[str, ...]  # every module whose channels are (or read) this space
    bns: tuple[str, ...]  # the BNs that rank it
    reason: str | None = None  # why a frozen space (or a kept coupled set) keeps its width
    pruned: bool = False  # whether a group shrinks it (or, for selection, its consumers)


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


# --- tracing -------------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """Leaves: torch.nn modules and ChannelSelection; remembers which module it is inside."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ChannelSelection) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):  # noqa: ANN001
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module: the one whose Python broke
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def _trace(model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, … on data-dependent Python
        where = tracer.failed_in or type(model).__name__
        raise SlimctlError(
            f"cannot trace {type(model).__name__}: module {where!r} ({type(exc).__name__}: {exc}). "
            "Mark that module a leaf (it then keeps its channels) or declare channel_groups() by hand."
        ) from exc
    gm = fx.GraphModule(tracer.root, graph)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise SlimctlError(
            f"{type(model).__name__} does not run on an example input of shape {tuple(example_input.shape)}: "
            f"{str(cause).splitlines()[0] if str(cause) else type(cause).__name__} (try a larger input size)"
        ) from exc
    return gm


# --- spaces --------------------------------------------------------------------------------------


@dataclass
class _Space:
    width: int
    producers: list[str] = field(default_factory=list)
    bns: list[str] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)  # other members (for --explain)
    reasons: list[str] = field(default_factory=list)
    residual: bool = False
    depthwise: bool = False
    divisions: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class _Seg:
    space: int
    width: int
    zero: bool  # a removed channel is exactly zero here (in the γ/β-zeroed reference)
    repeat: int = 1  # columns per channel (after flatten)


class _Walker:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.spaces: list[_Space] = []
        self.parent: list[int] = []
        self.layout: dict[fx.Node, list[_Seg] | None] = {}
        self.calls: dict[str, int] = {}
        self.bn_nodes: list[fx.Node] = []
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1

    # union-find
    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def space(self, i: int) -> _Space:
        return self.spaces[self.find(i)]

    def new(self, width: int, producer: str | None = None, reason: str | None = None) -> int:
        self.spaces.append(_Space(width, producers=[producer] if producer else []))
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
        for attr in ("producers", "bns", "consumers", "readers", "reasons"):
            getattr(sa, attr).extend(x for x in getattr(sb, attr) if x not in getattr(sa, attr))
        sa.residual |= sb.residual | residual
        sa.depthwise |= sb.depthwise
        sa.divisions |= sb.divisions
        self.parent[b] = a

    def freeze(self, segs: list[_Seg] | None, reason: str) -> None:
        for seg in segs or []:
            sp = self.space(seg.space)
            if reason not in sp.reasons:
                sp.reasons.append(reason)

    # helpers
    @staticmethod
    def shape(node: Any) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def frozen_output(self, node: fx.Node, reason: str) -> list[_Seg] | None:
        shape = self.shape(node)
        if shape is None or len(shape) < 2:
            return None
        return [_Seg(self.new(shape[1], reason=reason), shape[1], False)]

    def input_nodes(self, node: fx.Node) -> list[fx.Node]:
        return [n for n in node.all_input_nodes if self.layout.get(n) is not None]

    def opaque(self, node: fx.Node, desc: str) -> list[_Seg] | None:
        for n in self.input_nodes(node):
            self.freeze(self.layout[n], f"read by {desc}")
        return self.frozen_output(node, f"produced by {desc}")

    # the walk
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.layout[node] = self.visit(node)

    def visit(self, node: fx.Node) -> list[_Seg] | None:
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
        if node.op == "call_module":
            return self.visit_module(node, self.modules[node.target])
        return self.visit_function(node)

    def label(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{type(self.modules[node.target]).__name__} {node.target!r}"
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        return f"{name} ({node.name})"

    def inplace_on_shared(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            inplace = getattr(self.modules[node.target], "inplace", False)
        elif node.op == "call_method":
            inplace = node.target.endswith("_") and not node.target.endswith("__")
        else:
            inplace = node.kwargs.get("inplace", False) is True or node.target in (operator.iadd, operator.imul,
                                                                                  operator.isub, operator.itruediv)
        first = node.args[0] if node.args else None
        return bool(inplace) and isinstance(first, fx.Node) and len(first.users) > 1 and first in self.layout \
            and self.layout[first] is not None

    def single_input(self, node: fx.Node) -> list[_Seg] | None:
        first = node.args[0] if node.args else None
        return self.layout.get(first) if isinstance(first, fx.Node) else None

    def visit_module(self, node: fx.Node, m: nn.Module) -> list[_Seg] | None:
        name = node.target
        segs = self.single_input(node)
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) and self.calls[name] > 1:
            if isinstance(m, nn.BatchNorm2d):
                self.bn_nodes.append(node)
            return self.opaque(node, f"{type(m).__name__} {name!r}, called {self.calls[name]} times")
        if segs is None:
            return self.frozen_output(node, f"produced by {self.label(node)}")
        if isinstance(m, nn.Conv2d):
            return self.visit_conv(node, m, segs)
        if isinstance(m, nn.Linear):
            in_shape = self.shape(node.args[0])
            if in_shape is None or len(in_shape) != 2:
                return self.opaque(node, f"Linear {name!r} on a {len(in_shape or ())}-d input")
            self.consume(name, segs)
            return [_Seg(self.new(m.out_features, name), m.out_features, False)]
        if isinstance(m, nn.BatchNorm2d):
            self.bn_nodes.append(node)
            if len(segs) == 1 and segs[0].width == m.num_features:
                sp = self.space(segs[0].space)
                sp.bns.append(name)
                sp.producers.append(name)
            else:
                for seg in segs:
                    self.space(seg.space).readers.append(name)
                self.freeze(segs, f"read by BatchNorm2d {name!r} inside a concatenation")
            if selection_of(m) is not None:  # an inserted selection
                self.freeze(segs, f"BatchNorm2d {name!r} keeps its width (channel selection)")
                k = selection_of(m).indices.numel()
                return [_Seg(self.new(k, reason=f"selected channels of {name!r}"), k, True)]
            return [_Seg(s.space, s.width, True, s.repeat) for s in segs]
        if isinstance(m, ChannelSelection):
            self.freeze(segs, f"read by ChannelSelection {name!r} (its BN keeps its width)")
            k = m.indices.numel()
            return [_Seg(self.new(k, reason=f"selected channels ({name!r})"), k, all(s.zero for s in segs))]
        if isinstance(m, _ZERO_MODULES):
            return self.passed(node, segs, zero=True)
        if isinstance(m, _NONZERO_MODULES):
            return self.passed(node, segs, zero=False)
        if isinstance(m, nn.Flatten):
            return self.flattened(node, segs, m.start_dim, m.end_dim)
        if isinstance(m, _NORMS):
            return self.opaque(node, f"{type(m).__name__} {name!r} (only BatchNorm2d ranks channels)")
        return self.opaque(node, f"unsupported module {type(m).__name__} {name!r}")

    def consume(self, name: str, segs: list[_Seg]) -> None:
        offset = 0
        for seg in segs:
            sp = self.space(seg.space)
            sp.consumers.append(Consumer(name, offset, seg.repeat))
            if not seg.zero:
                sp.reasons.append(f"reaches {name!r} without a zeroing BatchNorm2d (no BN after its producer, "
                                  "or a Sigmoid-like op on the way)")
            offset += seg.width * seg.repeat

    def visit_conv(self, node: fx.Node, m: nn.Conv2d, segs: list[_Seg]) -> list[_Seg]:
        name = node.target
        if m.groups == 1:
            self.consume(name, segs)
            return [_Seg(self.new(m.out_channels, name), m.out_channels, False)]
        if m.groups == m.in_channels == m.out_channels:  # depthwise: the space passes through
            if len(segs) != 1:
                return self.opaque(node, f"depthwise conv {name!r} over a concatenation")
            sp = self.space(segs[0].space)
            sp.producers.append(name)
            sp.depthwise = True
            return [_Seg(segs[0].space, segs[0].width, segs[0].zero and m.bias is None)]
        # grouped: equal keep counts per group on both sides
        if len(segs) != 1 or m.out_channels % m.groups:
            return self.opaque(node, f"grouped conv {name!r} over a concatenation")
        self.consume(name, segs)
        self.space(segs[0].space).divisions.add(m.groups)
        out = self.new(m.out_channels, name)
        self.spaces[out].divisions.add(m.groups)
        return [_Seg(out, m.out_channels, False)]

    def passed(self, node: fx.Node, segs: list[_Seg], zero: bool) -> list[_Seg] | None:
        in_shape, out_shape = self.shape(node.args[0]), self.shape(node)
        if in_shape is None or out_shape is None or len(out_shape) < 2 or out_shape[1] != in_shape[1]:
            return self.opaque(node, self.label(node))
        return [_Seg(s.space, s.width, s.zero and zero, s.repeat) for s in segs]

    def flattened(self, node: fx.Node, segs: list[_Seg], start: int = 1, end: int = -1) -> list[_Seg] | None:
        in_shape, out_shape = self.shape(node.args[0]), self.shape(node)
        if in_shape is None or out_shape is None:
            return None
        if out_shape == in_shape:
            return segs
        if start == 1 and end in (-1, len(in_shape) - 1) and len(out_shape) == 2 and out_shape[0] == in_shape[0]:
            hw = math.prod(in_shape[2:])
            return [_Seg(s.space, s.width, s.zero, s.repeat * hw) for s in segs]
        return self.opaque(node, f"{self.label(node)} reshaping the channel dimension")

    def fname(self, node: fx.Node) -> Any:
        return node.target if node.op == "call_method" else getattr(node.target, "__name__", node.target)

    def visit_function(self, node: fx.Node) -> list[_Seg] | None:
        target, fname = node.target, self.fname(node)
        if fname in _NEUTRAL_FUNCS or target is getattr:
            return None
        segs = self.single_input(node)
        if target in _ADD or fname in _ADD:
            return self.combine(node, residual=True)
        if target in _MUL or fname in _MUL:
            return self.combine(node, residual=False)
        if target in _DIV or fname in _DIV:
            if segs is not None and not any(isinstance(a, fx.Node) and self.layout.get(a) for a in node.args[1:]):
                return segs
            return self.opaque(node, self.label(node))
        if fname in ("cat", "concat", "concatenate"):
            return self.concat(node)
        if not self.input_nodes(node):
            return self.frozen_output(node, f"produced by {self.label(node)}") if segs is None else None
        if segs is None:
            return self.opaque(node, self.label(node))
        if fname in _ZERO_FUNCS or target is F.max_pool2d:
            return self.passed(node, segs, zero=True)
        if fname in _NONZERO_FUNCS:
            return self.passed(node, segs, zero=False)
        if fname in ("flatten",):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flattened(node, segs, start, end)
        if fname in ("view", "reshape"):
            return self.flattened(node, segs)
        if fname in ("mean", "amax", "sum"):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            in_shape = self.shape(node.args[0])
            if dims and in_shape and all(d % len(in_shape) >= 2 for d in dims):
                return [_Seg(s.space, s.width, s.zero, s.repeat) for s in segs]
        return self.opaque(node, self.label(node))

    def concat(self, node: fx.Node) -> list[_Seg] | None:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shape = self.shape(node)
        if shape is None or dim % len(shape) != 1:
            return self.opaque(node, f"cat on dim {dim} ({node.name})")
        segs: list[_Seg] = []
        for t in tensors:
            if not isinstance(t, fx.Node) or self.layout.get(t) is None:
                return self.opaque(node, f"cat of an untracked value ({node.name})")
            segs += self.layout[t]
        return segs

    def combine(self, node: fx.Node, residual: bool) -> list[_Seg] | None:
        """add/sub (residual coupling) and mul (an SE gate: the gate's space is x's)."""
        out_shape = self.shape(node)
        if out_shape is None or len(out_shape) < 2:
            return self.opaque(node, self.label(node)) if self.input_nodes(node) else None
        c = out_shape[1]
        full, other_zero, scalar_nonzero = [], [], False
        for a in list(node.args) + list(node.kwargs.values()):
            shape = self.shape(a)
            if isinstance(a, fx.Node) and self.layout.get(a) is not None and shape and len(shape) >= 2 \
                    and shape[1] == c:
                full.append(self.layout[a])
            elif isinstance(a, fx.Node) and self.layout.get(a) is not None:
                other_zero.append(all(s.zero for s in self.layout[a]))  # broadcast over channels
            elif isinstance(a, (int, float)) and a != 0:
                scalar_nonzero = True
            elif isinstance(a, fx.Node) and shape is not None:  # a constant tensor (a buffer, …)
                scalar_nonzero = True
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
        out = []
        for i, s in enumerate(full[0]):
            zeros = [segs[i].zero for segs in full]
            if residual:  # a + b: zero only if every operand is
                zero = all(zeros) and all(other_zero) and not scalar_nonzero
            else:  # a * b: zero if any operand is
                zero = any(zeros) or any(other_zero)
            out.append(_Seg(s.space, s.width, zero, s.repeat))
        return out


# --- classification ------------------------------------------------------------------------------


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
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        norms = [f"{type(m).__name__} {n!r}" for n, m in model.named_modules() if isinstance(m, _NORMS)]
        found = f" (its norms: {', '.join(norms[:3])}{', …' if len(norms) > 3 else ''})" if norms else ""
        raise SlimctlError(
            f"{type(model).__name__} has no BatchNorm2d{found}: network slimming ranks channels by BN scale, "
            "so it cannot slim this model"
        )
    work = copy.deepcopy(model).train()  # aux heads exist only in train mode; ShapeProp updates BN stats
    gm = _trace(work, example_input.detach().to(next(iter(work.parameters())).device))
    walker = _Walker(gm)
    walker.run()
    return _classify(walker, coupled)


def _classify(w: _Walker, coupled: str) -> TraceResult:
    groups: list[ChannelGroup] = []
    spaces: list[SpaceInfo] = []
    roots = sorted({w.find(i) for i in range(len(w.spaces))})
    for root in roots:
        sp = w.spaces[root]
        reasons = list(sp.reasons)
        if not reasons and not sp.bns:
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
        kind = "coupled" if sp.residual else "grouped" if divisions > 1 else \
            "depthwise" if sp.depthwise or len(sp.bns) > 1 else "free"
        groups.append(ChannelGroup(
            bn=sp.bns[0], producers=tuple(dict.fromkeys(sp.producers)),
            consumers=tuple(dict.fromkeys(sp.consumers)), extra_bns=tuple(sp.bns[1:]),
            reduce=coupled if sp.residual else "max", divisions=divisions, coupled=sp.residual,
        ))
        spaces.append(SpaceInfo(kind, sp.width, members, tuple(sp.bns), pruned=True))

    grouped_bns = {b for g in groups for b in g.bns}
    to_insert = []
    for node in w.bn_nodes:
        name = node.target
        if name in grouped_bns:
            continue
        found = _selection(w, node)
        if found is None:
            continue
        selection, consumers, existing = found
        if not existing:
            to_insert.append(name)
        groups.append(ChannelGroup(bn=name, consumers=tuple(consumers), selection=selection))
        spaces.append(SpaceInfo("selection", w.modules[name].num_features,
                                (name, selection, *(c.module for c in consumers)), (name,),
                                "its space keeps its width; its consumers read the kept channels", pruned=True))
    ranked = grouped_bns | {g.bn for g in groups}
    frozen_bns = {}
    for node in w.bn_nodes:
        if node.target not in ranked:
            reasons = dict.fromkeys(r for seg in w.layout.get(node.args[0]) or [] for r in w.space(seg.space).reasons)
            frozen_bns[node.target] = "; ".join(reasons) or "its space keeps its width (residual-coupled)" \
                " and its output is not read by convs/Linears only"
    if not groups:
        frozen = [s.reason for s in spaces if s.reason][:3]
        raise SlimctlError(
            "no prunable channel group found in the traced graph"
            + (f" (e.g. {'; '.join(frozen)})" if frozen else "")
            + "; declare channel_groups() by hand"
        )
    return TraceResult(groups=groups, spaces=spaces, selections=tuple(to_insert), frozen_bns=frozen_bns)


def _selection(w: _Walker, bn_node: fx.Node) -> tuple[str, list[Consumer], bool] | None:
    """(selection name, consumers, selection exists) when the BN's output reaches only groups=1
    convs / Linears through zero-preserving per-channel ops; else None."""
    name = bn_node.target
    bn = w.modules[name]
    if w.calls[name] > 1:
        return None
    start, existing = bn_node, True
    if selection_of(bn) is not None:
        selection = f"{name}.{SELECT}"
    elif len(bn_node.users) == 1 and next(iter(bn_node.users)).op == "call_module" and isinstance(
            w.modules[next(iter(bn_node.users)).target], ChannelSelection):
        start = next(iter(bn_node.users))
        selection = start.target
    else:
        selection, existing = f"{name}.{SELECT}", False
    consumers: list[Consumer] = []
    stack = [(start, 1)]
    while stack:
        node, repeat = stack.pop()
        if not node.users:
            return None
        for user in node.users:
            if user.op != "call_module" and user.op not in ("call_function", "call_method"):
                return None
            if [a for a in user.all_input_nodes if w.layout.get(a) is not None] != [node] or user.args[0] is not node:
                return None
            m = w.modules.get(user.target) if user.op == "call_module" else None
            if m is not None and w.calls[user.target] > 1 and any(True for _ in m.parameters()):
                return None
            if isinstance(m, nn.Conv2d) and m.groups == 1 and repeat == 1:
                consumers.append(Consumer(user.target, 0, 1))
            elif isinstance(m, nn.Linear) and len(w.shape(node) or ()) == 2:
                consumers.append(Consumer(user.target, 0, repeat))
            elif (isinstance(m, _ZERO_MODULES) and not isinstance(m, ChannelSelection)) or (
                    m is None and (w.fname(user) in _ZERO_FUNCS or user.target is F.max_pool2d)):
                if (w.shape(user) or (0, -1))[1] != (w.shape(node) or (0, -2))[1]:
                    return None
                stack.append((user, repeat))
            elif isinstance(m, nn.Flatten) or (m is None and w.fname(user) in ("flatten", "view", "reshape")):
                in_shape, out_shape = w.shape(node), w.shape(user)
                if not in_shape or not out_shape or len(out_shape) != 2 or out_shape[0] != in_shape[0] \
                        or out_shape[1] != math.prod(in_shape[1:]):
                    return None
                stack.append((user, repeat * math.prod(in_shape[2:])))
            elif m is None and w.fname(user) in ("mean", "amax"):
                in_shape, out_shape = w.shape(node), w.shape(user)
                if not in_shape or not out_shape or len(out_shape) < 2 or out_shape[1] != in_shape[1]:
                    return None
                stack.append((user, repeat))
            else:
                return None
    return (selection, consumers, existing) if consumers else None


def space_rows(result: TraceResult) -> list[dict]:
    """JSON-able rows of `result.spaces` (for `slimctl groups --explain`)."""
    return [
        {"kind": s.kind, "width": s.width, "bns": list(s.bns), "members": list(s.members),
         "pruned": s.pruned, "reason": s.reason}
        for s in result.spaces
    ]

