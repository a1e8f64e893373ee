"""Fold each BatchNorm into the conv or Linear before it, where that is exact: the eval-mode model
users deploy, one pass over every feature map lighter.

In eval mode a BN is a per-channel affine map, y = s·(x − μ) + β with s = γ / √(var + ε). When x is
the output of one conv (or Linear) and nothing else reads that output, the map moves into the
layer: W ← s·W (per output channel; grouped and depthwise convs alike), b ← s·(b − μ) + β, and the
BN becomes `nn.Identity`. A `ConstantResponse` on the layer (`<layer>.compensate`, added to its
output by a hook before the BN sees it) is scaled by s too, per position term and all; one that is
only a per-channel bias joins the layer's new bias instead, and its hook goes. A BN with an
inserted `ChannelSelection` (`<bn>.select`) is replaced by that selection, so the gather stays.

Where the move is not exact the BN stays as it is, with the reason recorded (`fold_plan`): a BN
that reads an add or a concatenation (residual streams, pre-activation blocks, dense blocks), a
layer whose output something else reads too, a module called twice, a BN without running
statistics, hooks slimctl did not put there.

The pairs come from the model's torch.fx graph, traced by `slimctl.trace.graph.trace_graph` (the
tracer channel grouping uses, with ChannelSelection as a leaf), with shapes propagated on one
example input (`registry.input_size` unless given), so a BatchNorm1d is folded into a Linear only
on a 2-d output, where both mean the same features.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from slimctl.base.gates import gate_rows_of
from slimctl.base.inserted import SELECT, attach, detach_response, has_foreign_hooks, response_of, selection_of
from slimctl.base.registry import input_size
from slimctl.trace.rules import BN_PARTS, Op, bn_parts, call_counts, classify, is_bn, label, shape
from slimctl.trace.graph import trace_graph

__all__ = ["FoldPlan", "carry_constant_maps", "fold_bn", "fold_plan"]


@dataclass
class FoldPlan:
    """What `fold_bn` does to a model: the (layer, BN) pairs it folds, and each other BN with the
    reason it stays (module names)."""

    folds: list[tuple[str, str]] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)


def fold_plan(model: nn.Module, example_input: torch.Tensor | None = None) -> FoldPlan:
    """Which BNs of `model` fold into the layer before them, and why each other one stays (model unchanged)."""
    bns = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if not bns:
        return FoldPlan()
    work = copy.deepcopy(model).eval()
    return _plan(trace_graph(work, _example(work, example_input)), bns)


def batchnorm_count(model: nn.Module) -> int:
    """BatchNorm modules in `model` (any kind): what folding leaves is this count afterwards."""
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def fold_bn(model: nn.Module, example_input: torch.Tensor | None = None, *, carry_maps: bool = True) -> nn.Module:
    """A copy of `model` in eval mode with every BN folded into its conv / Linear where that is exact,
    and (`carry_maps`) each per-position compensation term carried by a constant channel where it
    can be (`carry_constant_maps`: no hook and no extra op per compensated layer).

    The input model is not changed. The copy computes what `model.eval()` computes (to rounding; the
    folded weights are computed in float64) and is meant for inference only: a folded BN has no
    running statistics left to train. `example_input` (a batch the model accepts) is what the graph
    is traced with; by default zeros of the model's input size (`registry.input_size`). A model
    torch.fx cannot trace is a SlimctlError naming the module that broke.
    """
    work = copy.deepcopy(model).eval()
    bns = [n for n, m in work.named_modules() if isinstance(m, _BatchNorm)]
    example = _example(work, example_input)
    if bns:
        plan = _plan(trace_graph(work, example), bns)
        for layer_name, bn_name in plan.folds:
            bn = work.get_submodule(bn_name)
            _fold_into(work.get_submodule(layer_name), bn)
            _replace(work, bn_name, _after_fold(bn))
    if carry_maps and any(_carried_map(m) for m in work.modules()):
        carry_constant_maps(work, example)
    return work.eval()


# --- per-position terms as a constant channel ------------------------------------------------------


def carried_producers(model: nn.Module, example_input: torch.Tensor | None = None) -> set[str]:
    """The convs to which `fold_bn` gives one more output channel (the constant that carries a
    per-position compensation term; `carry_constant_maps`): their deployed width is one above the
    pruned model's, which matters to a runtime that wants widths in multiples of 8."""
    work = fold_bn(model, example_input, carry_maps=False)
    if not any(_carried_map(m) for m in work.modules()):
        return set()
    return {producer for producer, _ in carry_constant_maps(work, _example(work, example_input))}


def _carried_map(layer: nn.Module) -> bool:
    """A conv whose constant response has a per-position part that one input channel of ones,
    zero-padded by the conv itself, reproduces (groups=1, its own zero padding; no profile, no gate)."""
    response = response_of(layer)
    return (response is not None and response.kernel.numel() > 0 and isinstance(layer, nn.Conv2d)
            and layer.groups == 1 and "pkernel" not in response._buffers and "gate_weight" not in response._buffers)


@torch.no_grad()
def carry_constant_maps(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, str]]:
    """In place (an inference copy): each per-position constant response of a conv L becomes one more
    input channel of L (weight: the response's reduced kernel), fed by one more output channel of the
    conv P that produces L's input (zero weights, bias 1, then P's activation and pools: a constant v).
    L's own zero padding then makes the border values, so the exact term costs no separate op: a
    forward hook and a full-map add per layer become 1/C more channels. Only where the path P → L
    is per-channel ops with no other reader; elsewhere the response stays. Returns the (P, L) pairs."""
    gm = trace_graph(model, example_input)
    modules = dict(gm.named_modules())
    calls = call_counts(gm.graph)
    pairs = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and _carried_map(modules[node.target]) and calls[node.target] == 1:
            producer = _sole_producer(node, modules, calls)
            if producer is not None:
                pairs.append((producer, node.target))
    for producer, layer in pairs:
        _widen_output(model.get_submodule(producer))
        _widen_input(model.get_submodule(layer))
    values = _carried_values(model, example_input, [layer for _, layer in pairs])
    carried = []
    for producer, layer in pairs:
        value = values.get(layer)
        if value is None:  # the extra channel did not arrive as one nonzero constant: undo
            _narrow_output(model.get_submodule(producer))
            _narrow_input(model.get_submodule(layer))
            continue
        _absorb_response(model.get_submodule(layer), value)
        carried.append((producer, layer))
    return carried


def _sole_producer(node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]) -> str | None:
    """The conv whose output reaches `node` (a conv's call) through per-channel ops only, each read by
    nothing else; None if there is none."""
    current = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    while isinstance(current, fx.Node) and len(current.users) == 1 and current.op == "call_module":
        module = modules[current.target]
        if isinstance(module, nn.Conv2d):
            plain = type(module).forward is nn.Conv2d.forward and module.groups == 1 and calls[current.target] == 1
            return current.target if plain and not has_foreign_hooks(module) and gate_rows_of(module) is None else None
        rule = classify(current, modules, calls)
        if rule.op is not Op.PER_CHANNEL or not rule.constant or rule.profile is not None or len(current.args) != 1:
            return None
        current = current.args[0]
    return None


def _widen_output(conv: nn.Conv2d) -> None:
    """One more output channel: zero weights, bias 1 (its response, if any, adds 0 there)."""
    weight = conv.weight
    conv.weight = nn.Parameter(torch.cat([weight, weight.new_zeros(1, *weight.shape[1:])]), requires_grad=False)
    bias = conv.bias if conv.bias is not None else weight.new_zeros(weight.shape[0])
    conv.bias = nn.Parameter(torch.cat([bias, bias.new_ones(1)]), requires_grad=False)
    conv.out_channels += 1
    response = response_of(conv)
    if response is not None:
        attach(conv, response.take_rows(torch.cat([torch.arange(weight.shape[0]), torch.zeros(1, dtype=torch.long)])))
        response_of(conv).scale_rows(torch.cat([torch.ones(weight.shape[0]), torch.zeros(1)]).double())


def _narrow_output(conv: nn.Conv2d) -> None:
    conv.weight = nn.Parameter(conv.weight[:-1], requires_grad=False)
    conv.bias = nn.Parameter(conv.bias[:-1], requires_grad=False)
    conv.out_channels -= 1
    response = response_of(conv)
    if response is not None:
        attach(conv, response.take_rows(torch.arange(conv.out_channels)))


def _carried_values(model: nn.Module, example_input: torch.Tensor, layers: list[str]) -> dict[str, float]:
    """What the extra (last) input channel of each layer carries on `example_input`, where that is one
    nonzero constant over the batch and the map."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, name=name: seen.__setitem__(name, args[0][:, -1].detach())) for name in layers]
    try:
        model(example_input)
    finally:
        for h in hooks:
            h.remove()
    values = {}
    for name, channel in seen.items():
        value = float(channel.flatten()[0])
        if value != 0 and bool((channel == value).all()):
            values[name] = value
    return values


def _widen_input(conv: nn.Conv2d) -> None:
    """One more input channel, read with zero weights (until `_absorb_response`)."""
    weight = conv.weight
    conv.weight = nn.Parameter(torch.cat([weight, weight.new_zeros(weight.shape[0], 1, *weight.shape[2:])], dim=1),
                               requires_grad=False)
    conv.in_channels += 1


def _narrow_input(conv: nn.Conv2d) -> None:
    conv.weight = nn.Parameter(conv.weight[:, :-1], requires_grad=False)
    conv.in_channels -= 1


def _absorb_response(conv: nn.Conv2d, value: float) -> None:
    """The conv's last input channel carries the constant `value`: its weight there becomes the
    response's reduced kernel / value, and the response's per-channel part joins its bias."""
    response = response_of(conv)
    conv.weight[:, -1] = (response.kernel.to(torch.float64) / value).to(conv.weight.dtype)
    bias = conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.weight.shape[0])
    conv.bias = nn.Parameter(bias + response.bias.to(bias), requires_grad=False)
    detach_response(conv)



# --- which pairs ---------------------------------------------------------------------------------


def _example(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor:
    if example_input is not None:
        return example_input.detach()
    tensors = [*model.parameters(), *model.buffers()]
    floats = [t for t in tensors if t.is_floating_point()]
    like = floats[0] if floats else (tensors[0] if tensors else torch.zeros(()))
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return torch.zeros(1, *input_size(model), device=like.device, dtype=dtype)


def _plan(gm: fx.GraphModule, bns: list[str]) -> FoldPlan:
    modules = dict(gm.named_modules())
    calls = call_counts(gm.graph)
    plan = FoldPlan()
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm) or node.target in seen:
            continue
        seen.add(node.target)
        layer, why = _pair(node, modules, calls)
        if why is None:
            plan.folds.append((layer, node.target))
        else:
            plan.kept[node.target] = why
    for name in bns:
        if name not in seen:
            plan.kept[name] = "not called in the traced eval-mode forward"
    return plan


def _pair(node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]) -> tuple[str | None, str | None]:
    """(the layer `node`'s BN folds into, None) or (None, why it cannot)."""
    bn = modules[node.target]
    if calls[node.target] > 1:
        return None, f"called {calls[node.target]} times"
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return None, "it has no running statistics (it normalizes with batch statistics)"
    if has_foreign_hooks(bn):
        return None, "it has hooks slimctl did not insert"
    if is_bn(bn) and bn_parts(bn) is None:
        return None, f"{type(bn).__name__} has a forward of its own"
    source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if not isinstance(source, fx.Node):
        return None, "it is called with other arguments than one tensor"
    if source.op != "call_module":
        return None, f"its input is {label(source, modules)}, not a conv's or Linear's output"
    layer = modules[source.target]
    what = f"{type(layer).__name__} {source.target!r}"
    if isinstance(layer, nn.Conv2d):
        if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            return None, f"a {type(bn).__name__} after {what}"
    elif isinstance(layer, nn.Linear):
        out = shape(source)
        if not isinstance(bn, nn.BatchNorm1d) or out is None or len(out) != 2:
            return None, f"a {type(bn).__name__} after {what} on a {len(out or ())}-d output"
    else:
        return None, f"its input is {what}, not a conv or Linear"
    if calls[source.target] > 1:
        return None, f"{what} is called {calls[source.target]} times"
    others = [label(u, modules) if u.op != "output" else "the model's output" for u in source.users if u is not node]
    if others:
        return None, f"the output of {what} is also read by {', '.join(others)}"
    if has_foreign_hooks(layer):
        return None, f"{what} has hooks slimctl did not insert"
    if getattr(layer, "out_channels", getattr(layer, "out_features", None)) != bn.num_features:
        return None, f"{what} has {layer.weight.shape[0]} outputs, the BN {bn.num_features}"
    return source.target, None


# --- folding -------------------------------------------------------------------------------------


@torch.no_grad()
def _fold_into(layer: nn.Conv2d | nn.Linear, bn: _BatchNorm) -> None:
    """W ← s·W, b ← s·(b − μ) + β, and the layer's constant response ← s·response (float64 math)."""
    f64 = torch.float64
    mean, var = bn.running_mean.to(f64), bn.running_var.to(f64)
    gamma = bn.weight.to(f64) if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.to(f64) if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    weight = layer.weight
    bias = layer.bias.to(f64) if layer.bias is not None else torch.zeros_like(mean)
    per_row = scale.view(-1, *(1,) * (weight.dim() - 1))
    response = response_of(layer)
    per_channel = response is not None and not response.kernel.numel()
    if per_channel:  # a plain bias on the layer's output: it joins the layer's bias, one add less per call
        bias = bias + response.bias.to(f64)
        detach_response(layer)
    layer.weight = nn.Parameter((weight.to(f64) * per_row).to(weight.dtype), requires_grad=weight.requires_grad)
    layer.bias = nn.Parameter(((bias - mean) * scale + beta).to(weight.dtype), requires_grad=weight.requires_grad)
    if response is not None and not per_channel:  # added to the output before the BN saw it: scaled like it
        response.scale_rows(scale)


def _after_fold(bn: nn.Module) -> nn.Module:
    """What stays of a folded BN: the parts a BN subclass applies after normalising (timm's
    BatchNormAct2d: drop, act) and an inserted selection, under their own names; else Identity."""
    parts = [(n, c) for n, c in ((n, getattr(bn, n, None)) for n in BN_PARTS) if isinstance(c, nn.Module)]
    selection = selection_of(bn)
    if selection is not None:
        parts.append((SELECT, selection))
    if not parts:
        return nn.Identity()
    return parts[0][1] if len(parts) == 1 and parts[0][0] == SELECT else nn.Sequential(OrderedDict(parts))


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
