"""The op table: what one fx node does to the channels flowing through it.

`classify(node, modules, calls)` answers for any node of a shape-propagated fx graph with an
`OpRule`: the kind of op (`Op`) and, for ops that pass channels on, two flags about a *removed*
channel (one whose BN's γ is zeroed or ≈ 0):

- `zero`: f(0) = 0, so a channel that is exactly zero (γ and β zeroed) stays zero — what makes
  pruning exact (the consumer may drop the channel);
- `constant`: a channel that is constant over batch and space (γ ≈ 0: the BN emits β) stays constant
  — what lets pruning add that constant's response to the consumer (β compensation).

BatchNorm variants: BatchNorm2d and SyncBatchNorm rank channels; a subclass that applies more after
normalising (timm's BatchNormAct2d: BN → drop → act, `bn_parts`) is traced as the BN followed by
its parts as nodes of their own, so its activation is judged by this table like any other; frozen
BNs (torchvision's / timm's FrozenBatchNorm2d, FrozenBatchNormAct2d) and affine=False BNs rank
nothing and freeze their spaces with the reason (`frozen_bn_note`). `is_leaf` names the library
layers the tracer keeps whole (timm's Conv2dSame and DropPath among them).

Both the walk over the whole graph (`walk.py`) and selection detection (`grouping.py`, which follows
one BN's output forward) dispatch on this one table, so they cannot disagree about an op. What the
table cannot decide alone — how many segments reach an op, whether an operand is tracked — is left
to its callers.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from slimctl.base.inserted import COMPENSATE, SELECT, ChannelSelection


class Op(Enum):
    CONSUMER = "consumer"  # Conv2d with groups=1, Linear on a 2-d input: reads spaces, makes a new one
    GROUPED = "grouped"  # grouped Conv2d: reads its space in equal chunks, makes a new one
    DEPTHWISE = "depthwise"  # depthwise Conv2d: the space passes through, filtered per channel
    BN = "bn"  # BatchNorm2d: ranks the space; after it a removed channel is zero / the constant β
    SELECTION = "selection"  # ChannelSelection: passes on the kept channels only (a new space)
    REUSED = "reused"  # a Conv2d / BatchNorm2d / Linear called twice: one set of channels for two spaces
    PER_CHANNEL = "per_channel"  # keeps each channel in place: activations, dropout, pools, identity, …
    FLATTEN = "flatten"  # flatten / view / reshape: (N, C, H, W) → (N, C·H·W), H·W columns per channel
    REDUCE = "reduce"  # mean / amax / sum over spatial dims only (dims ≥ 2)
    ADD = "add"  # add / sub: a residual joins the spaces of its operands
    MUL = "mul"  # mul: an SE gate joins the gate's space with the gated one
    DIV = "div"  # div: by a scalar the channels pass on; by a tracked tensor it is opaque
    CAT = "cat"  # cat: on dim 1 the segments follow each other; else opaque
    NEUTRAL = "neutral"  # size / dim / getattr, …: no channels flow on
    NORM = "norm"  # a norm other than BatchNorm2d: nothing ranks its channels, it freezes them
    UNKNOWN = "unknown"  # anything else: opaque, freezes every space it touches


@dataclass(frozen=True)
class OpRule:
    op: Op
    zero: bool = True  # PER_CHANNEL / DEPTHWISE: f(0) = 0 per channel
    constant: bool = True  # PER_CHANNEL / DEPTHWISE: a channel constant over batch and space stays constant
    # PER_CHANNEL / DEPTHWISE with constant=False: the op, as `--explain` names it ("AvgPool2d 'pool'
    # with zero padding"); REUSED / NORM / UNKNOWN: the op, as a frozen space's reason names it.
    note: str = ""
    dims: tuple[int, int] = (1, -1)  # FLATTEN: its start and end dims
    # PER_CHANNEL: a stride-1 average pool counting zero padding, (kh, kw, ph, pw): a constant c
    # leaves it as c·P (P: the pool of an all-ones map), which β compensation can still follow.
    profile: tuple[int, int, int, int] | None = None
    identity: bool = False  # PER_CHANNEL: the identity in eval mode (dropout, DropPath, identity, copies)


# Per-channel modules that map 0 to 0 (a zeroed channel stays zero) ...
ZERO_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.Tanh, nn.Hardtanh,
    nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample,
)
# ... and those that do not (they pass channels on, but a zeroed channel is not zero after them).
NONZERO_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
ZERO_FUNCS = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "gelu", "silu",
    "hardswish", "mish", "tanh", "dropout", "dropout2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
    "adaptive_max_pool2d", "contiguous", "clone", "stochastic_depth", "detach", "interpolate", "upsample",
    "upsample_nearest", "upsample_bilinear",
}
NONZERO_FUNCS = {"sigmoid", "sigmoid_", "hardsigmoid", "softplus", "exp"}
# Every per-channel op above maps a constant channel to a constant one (elementwise functions do
# trivially; max-pool pads with -inf, adaptive pools average real pixels only, interpolation weights
# sum to one and clamp at the borders), except an average
# pool that counts zero padding in its divisor: see `_avg_pool_rule`.
# Per-channel ops that are the identity in eval mode: a constant's profile or gate passes them unchanged.
IDENTITY_MODULES = (nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.Identity)
IDENTITY_FUNCS = {"dropout", "dropout2d", "contiguous", "clone", "stochastic_depth", "detach"}
NEUTRAL_FUNCS = {"size", "dim", "getattr", "numel", "_assert", "is_scripting"}
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d, nn.BatchNorm1d, nn.BatchNorm3d, nn.LocalResponseNorm)
ADD = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, "add", "add_", "sub", "sub_"}
SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
CAT = {"cat", "concat", "concatenate"}
REDUCTIONS = {"mean", "amax", "sum"}
RESHAPES = {"view", "reshape"}


# --- BatchNorm variants and other library layers ---------------------------------------------------

BNS = (nn.BatchNorm2d, nn.SyncBatchNorm)  # the norms that rank channels (SyncBatchNorm: a DDP sync_bn model)
_PLAIN_BN_FORWARDS = (nn.BatchNorm2d.forward, nn.SyncBatchNorm.forward, nn.modules.batchnorm._BatchNorm.forward)
BN_PARTS = ("drop", "act")  # what a BN subclass may apply after normalising, in this order (timm's BatchNormAct2d)
_INSERTED_CHILDREN = (SELECT, COMPENSATE)  # slimctl's own children (slimctl.base.inserted)


def is_bn(m: nn.Module) -> bool:
    return isinstance(m, BNS)


def bn_parts(m: nn.Module) -> list[nn.Module] | None:
    """The modules a BN subclass applies to its output after normalising (timm's BatchNormAct2d,
    SyncBatchNormAct: BN → drop → act), in order; [] for a BN that only normalises; None for a BN
    subclass with a forward of its own and other children (its extra work is unknown)."""
    if not is_bn(m):
        return None
    children = {n: c for n, c in m.named_children() if n not in _INSERTED_CHILDREN}
    if type(m).forward in _PLAIN_BN_FORWARDS:  # only normalises (children it has, it never calls)
        return []
    if children and set(children) <= set(BN_PARTS):
        return [children[n] for n in BN_PARTS if n in children]
    return None


def frozen_bn_note(m: nn.Module, name: str) -> str | None:
    """Why a BatchNorm-like module cannot rank its channels (None if it can): frozen statistics and
    affine parameters (torchvision's FrozenBatchNorm2d, timm's FrozenBatchNorm2d /
    FrozenBatchNormAct2d), or no affine parameters at all (affine=False)."""
    kind = type(m).__name__
    if "FrozenBatchNorm" in kind:
        return (f"{kind} {name!r} (frozen: its γ and β are buffers, never trained or sparsified, so nothing ranks "
                "these channels; build the model with trainable BatchNorm2d to slim them)")
    if is_bn(m) and not m.affine:
        return f"{kind} {name!r} (affine=False: no γ ranks these channels)"
    return None


def _forward_overridden(m: nn.Module, base: type) -> bool:
    return type(m).forward is not base.forward


def same_padding(m: nn.Module) -> bool:
    """timm's Conv2dSame: TensorFlow-style 'same' zero padding computed at run time (its `padding`
    attribute says 0)."""
    return type(m).__name__ == "Conv2dSame"


def is_leaf(m: nn.Module) -> bool:
    """Modules the tracer keeps whole although they live outside torch.nn: BatchNorm variants (a BN
    subclass's drop/act are traced as their own nodes by the tracer), frozen BNs, conv subclasses
    (timm's Conv2dSame is a consumer; others with a forward of their own are opaque) and timm's
    DropPath (per sample: a removed channel stays zero)."""
    kind = type(m).__name__
    return (is_bn(m) or "FrozenBatchNorm" in kind or isinstance(m, nn.Conv2d) or kind == "DropPath")


# --- what the table reads from a node ------------------------------------------------------------


def shape(node: Any) -> tuple[int, ...] | None:
    """The shape ShapeProp recorded for a tensor-valued node (None for anything else)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def fname(node: fx.Node) -> Any:
    """A function's or method's name (the module path for call_module)."""
    return node.target if node.op == "call_method" else getattr(node.target, "__name__", node.target)


def label(node: fx.Node, modules: Mapping[str, nn.Module]) -> str:
    """How reasons name an op: "Conv2d 'features.3'" or "relu (relu_2)"."""
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} {node.target!r}"
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{name} ({node.name})"


def call_counts(graph: fx.Graph) -> dict[str, int]:
    """How many times the graph calls each module."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def columns_per_channel(in_shape: tuple[int, ...], out_shape: tuple[int, ...], start: int = 1,
                        end: int = -1) -> int | None:
    """A flatten/view that keeps channels: input columns per channel after it (H·W after
    (N, C, H, W) → (N, C·H·W); 1 when it changes nothing); None when it reshapes the channels."""
    if out_shape == in_shape:
        return 1
    if start == 1 and end in (-1, len(in_shape) - 1) and len(out_shape) == 2 and out_shape[0] == in_shape[0]:
        return math.prod(in_shape[2:])
    return None


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _keeps_channels(node: fx.Node) -> bool:
    in_shape, out_shape = shape(node.args[0] if node.args else None), shape(node)
    return in_shape is not None and out_shape is not None and len(out_shape) >= 2 and out_shape[1] == in_shape[1]


def _spatial(node: fx.Node) -> bool:
    """A reduction over spatial dims only (dims ≥ 2, given explicitly)."""
    dims = _arg(node, 1, "dim", None)
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    in_shape = shape(node.args[0] if node.args else None)
    return bool(dims) and bool(in_shape) and all(d % len(in_shape) >= 2 for d in dims)


def _padded(padding: Any, kernel_size: Any) -> bool:
    if isinstance(padding, str):  # "valid" pads nothing; "same" pads unless the kernel is 1×1
        return padding == "same" and any(k != 1 for k in (kernel_size if isinstance(kernel_size, tuple)
                                                          else (kernel_size,)))
    return any(p != 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _avg_pool_rule(what: str, kernel: Any, stride: Any, padding: Any, ceil_mode: bool, count_include_pad: bool,
                   divisor_override: Any) -> OpRule:
    """An average pool maps a constant to a constant unless a window's divisor counts padding zeros
    (border windows then average fewer real pixels), or a fixed divisor meets partial windows. At
    stride 1 the zero-padded case is followed as a profile: c → c·P, P the pool of an all-ones map
    (its input size is its output size plus k − 1 − 2p, so the profile can be rebuilt at any size)."""
    padded = _padded(padding, 1)
    if divisor_override is not None:
        if padded or ceil_mode:
            return OpRule(Op.PER_CHANNEL, constant=False, note=f"{what} with divisor_override over partial windows")
        return OpRule(Op.PER_CHANNEL)
    if padded and count_include_pad:
        if _pair(stride if stride not in (None, []) else kernel) == (1, 1) and not isinstance(padding, str):
            return OpRule(Op.PER_CHANNEL, profile=(*_pair(kernel), *_pair(padding)), note=f"{what} with zero padding")
        return OpRule(Op.PER_CHANNEL, constant=False, note=f"{what} with zero padding and a stride other than 1")
    return OpRule(Op.PER_CHANNEL)


# --- the table -----------------------------------------------------------------------------------


def classify(node: fx.Node, modules: Mapping[str, nn.Module], calls: Mapping[str, int]) -> OpRule:
    """The rule for one call node (call_module / call_function / call_method) of a graph whose
    shapes ShapeProp recorded; `calls` counts module calls (`call_counts`)."""
    if node.op == "call_module":
        return _module_rule(node, modules[node.target], modules, calls[node.target])
    return _function_rule(node, modules)


def _module_rule(node: fx.Node, m: nn.Module, modules: Mapping[str, nn.Module], calls: int) -> OpRule:
    name = node.target
    frozen = frozen_bn_note(m, name)
    if frozen is not None:
        return OpRule(Op.NORM, note=frozen)
    if isinstance(m, (nn.Conv2d, *BNS, nn.Linear)) and calls > 1:
        return OpRule(Op.REUSED, note=f"{type(m).__name__} {name!r}, called {calls} times")
    if isinstance(m, nn.Conv2d):
        same = same_padding(m)
        if _forward_overridden(m, nn.Conv2d) and not same:
            return OpRule(Op.UNKNOWN, note=f"{type(m).__name__} {name!r} (a Conv2d subclass with a forward of its "
                                           "own: how it reads its input channels is unknown)")
        padded = (m.padding_mode == "zeros" and _padded(m.padding, m.kernel_size)) or \
            (same and any(k > 1 for k in m.kernel_size))
        if m.groups == 1:  # (a removed constant's response is computed with the layer's own forward,
            return OpRule(Op.CONSUMER)  # so run-time 'same' padding needs no rule of its own)
        if m.groups == m.in_channels == m.out_channels:
            # Zero padding makes a constant map uneven at the borders (other padding modes do not).
            return OpRule(Op.DEPTHWISE, zero=m.bias is None, constant=not padded,
                          note="" if not padded else f"depthwise {type(m).__name__} {name!r} with zero padding")
        return OpRule(Op.GROUPED)
    if isinstance(m, nn.Linear):
        in_shape = shape(node.args[0])
        if in_shape is None or len(in_shape) != 2:
            return OpRule(Op.UNKNOWN, note=f"Linear {name!r} on a {len(in_shape or ())}-d input")
        return OpRule(Op.CONSUMER)
    if is_bn(m):
        in_shape = shape(node.args[0]) if node.args else None
        if bn_parts(m) is None:
            return OpRule(Op.UNKNOWN, note=f"{type(m).__name__} {name!r} (a BatchNorm subclass with a forward of its "
                                           f"own; understood: BN → {' → '.join(BN_PARTS)} children)")
        if in_shape is None or len(in_shape) != 4:
            return OpRule(Op.NORM, note=f"{type(m).__name__} {name!r} on a {len(in_shape or ())}-d input")
        return OpRule(Op.BN)
    if type(m).__name__ == "DropPath":  # per sample: zero stays zero (identity in eval mode)
        return OpRule(Op.PER_CHANNEL, identity=True)
    if isinstance(m, ChannelSelection):
        return OpRule(Op.SELECTION)
    if isinstance(m, (*ZERO_MODULES, *NONZERO_MODULES)):
        if not _keeps_channels(node):
            return OpRule(Op.UNKNOWN, note=label(node, modules))
        if isinstance(m, nn.AvgPool2d):
            return _avg_pool_rule(label(node, modules), m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                  m.count_include_pad, m.divisor_override)
        return OpRule(Op.PER_CHANNEL, zero=isinstance(m, ZERO_MODULES), identity=isinstance(m, IDENTITY_MODULES))
    if isinstance(m, nn.Flatten):
        return OpRule(Op.FLATTEN, dims=(m.start_dim, m.end_dim))
    if isinstance(m, NORMS):
        return OpRule(Op.NORM, note=f"{type(m).__name__} {name!r} (only BatchNorm2d ranks channels)")
    return OpRule(Op.UNKNOWN, note=f"unsupported module {type(m).__name__} {name!r}")


def _function_rule(node: fx.Node, modules: Mapping[str, nn.Module]) -> OpRule:
    target, name = node.target, fname(node)
    if name in NEUTRAL_FUNCS or target is getattr:
        return OpRule(Op.NEUTRAL)
    if target in ADD or name in ADD:
        return OpRule(Op.ADD)
    if target in MUL or name in MUL:
        return OpRule(Op.MUL)
    if target in DIV or name in DIV:
        return OpRule(Op.DIV)
    if name in CAT:
        return OpRule(Op.CAT)
    if name in ZERO_FUNCS or name in NONZERO_FUNCS or target is F.max_pool2d:
        if not _keeps_channels(node):
            return OpRule(Op.UNKNOWN, note=label(node, modules))
        if name == "avg_pool2d":  # (input, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
            return _avg_pool_rule(label(node, modules), _arg(node, 1, "kernel_size", 1), _arg(node, 2, "stride", None),
                                  _arg(node, 3, "padding", 0), _arg(node, 4, "ceil_mode", False),
                                  _arg(node, 5, "count_include_pad", True), _arg(node, 6, "divisor_override", None))
        return OpRule(Op.PER_CHANNEL, zero=name not in NONZERO_FUNCS, identity=name in IDENTITY_FUNCS)
    if name == "flatten":
        return OpRule(Op.FLATTEN, dims=(_arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)))
    if name in RESHAPES:
        return OpRule(Op.FLATTEN)
    if name in REDUCTIONS and _spatial(node):
        return OpRule(Op.REDUCE)
    return OpRule(Op.UNKNOWN, note=label(node, modules))


# --- gates ---------------------------------------------------------------------------------------
# The elementwise ops of a gate's chain (squeeze-and-excitation: x · act(fc(…))), as plain data
# (op, a, b) that `slimctl.base.gates.GATE_OPS` evaluates; ("same", 0, 0) for a reshape or an
# identity that keeps the channels. None: an op a gate chain cannot contain.


def gate_module_op(m: nn.Module) -> tuple[str, float, float] | None:
    if isinstance(m, nn.Sigmoid):
        return ("sigmoid", 0.0, 0.0)
    if isinstance(m, nn.Hardsigmoid):
        return ("hardsigmoid", 0.0, 0.0)
    if isinstance(m, nn.ReLU):
        return ("relu", 0.0, 0.0)
    if isinstance(m, nn.Hardtanh):  # ReLU6 too
        return ("hardtanh", float(m.min_val), float(m.max_val))
    if isinstance(m, nn.Tanh):
        return ("tanh", 0.0, 0.0)
    if isinstance(m, IDENTITY_MODULES):
        return ("same", 0.0, 0.0)
    return None


_GATE_FUNCS = {"sigmoid": "sigmoid", "hardsigmoid": "hardsigmoid", "relu": "relu", "tanh": "tanh"}
_SHAPE_ONLY = {"view", "reshape", "flatten", "unsqueeze", "squeeze", "contiguous", "clone", "dropout", "detach"}


def gate_function_op(node: fx.Node, modules: Mapping[str, nn.Module]) -> tuple[str, float, float] | None:
    name = fname(node)
    name = name[:-1] if isinstance(name, str) and name.endswith("_") and not name.endswith("__") else name
    if name in _GATE_FUNCS:
        return (_GATE_FUNCS[name], 0.0, 0.0)
    if name == "relu6":
        return ("hardtanh", 0.0, 6.0)
    if name == "hardtanh":
        return ("hardtanh", float(_arg(node, 1, "min_val", -1.0)), float(_arg(node, 2, "max_val", 1.0)))
    if name in _SHAPE_ONLY:
        in_shape, out_shape = shape(node.args[0] if node.args else None), shape(node)
        same = in_shape is not None and out_shape is not None and math.prod(in_shape) == math.prod(out_shape)
        return ("same", 0.0, 0.0) if same and in_shape[:2] == out_shape[:2] else None
    numbers = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    if len(numbers) != 1 or len(node.args) != 2:
        return None
    value, first = float(numbers[0]), not isinstance(node.args[0], fx.Node)
    target = node.target
    if target in SUB or name in SUB:
        return ("rsub", value, 0.0) if first else ("add", -value, 0.0)
    if target in ADD or name in ADD:
        return ("add", value, 0.0)
    if target in MUL or name in MUL:
        return ("mul", value, 0.0)
    if (target in DIV or name in DIV) and not first:
        return ("div", value, 0.0)
    return None
