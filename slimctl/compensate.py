"""β-compensated removal: what a removed channel still emitted is carried into the layers that read it.

After sparse training a channel with γ ≈ 0 outputs the constant β (its BN: γ·x̂ + β). Through
constant-preserving ops (ReLU, pooling, dropout, …) it reaches its consumers as a constant
c = act(β), which they read as a bias. Literal removal (the paper's, `none`) drops that bias and
shifts every later activation; strongly sparsified networks use such channels as biases, so the
accuracy right after pruning collapses. Here the consumer keeps the constant's response:

- `exact`: a Linear (or an unpadded conv) reads c everywhere, so its response is a per-channel
  bias W[:, removed]·c, folded into the layer's own bias where it has one. A zero-padded k×k conv
  sees fewer constant taps near its borders, so its response is position-dependent: the reduced
  kernel Σ_c W[o, c]·c_c, applied to an all-ones map of the input's size (`inserted.ConstantResponse`).
  The pruned model then equals the original with only the removed channels' γ zeroed.
- `bias`: only the spatial mean of that response, at the model's input size (a plain bias; exact
  for Linear and unpadded consumers, lossy near padded borders).
- `none`: nothing is carried (the pruned model equals the original with γ and β zeroed).

The constants are measured, not derived: a forward pass of the original with the removed
channels' γ zeroed records what each consumer reads at the removed columns. A consumer the
channel groups mark as non-constant (`Consumer.constant`), or whose recorded columns are not
constant over batch and space, is left uncompensated and named in the notes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from slimctl.inserted import attach_response
from slimctl.plan import ChannelPlan
from slimctl.registry import input_size

COMPENSATE_MODES = ("exact", "bias", "none")


@dataclass
class Term:
    """What one layer gains from the removed channels it read, over all of its output channels."""

    bias: torch.Tensor  # [out]
    kernel: torch.Tensor | None = None  # [out, kh, kw]: the per-position part (exact mode, padded convs)


@dataclass
class Compensation:
    terms: dict[str, Term] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # consumers left uncompensated, and why


def removed_positions(model: nn.Module, plan: ChannelPlan) -> dict[str, torch.Tensor]:
    """BN name → the channel indices (of the BN's full width) whose γ the plan removes."""
    removed: dict[str, list[torch.Tensor]] = {}
    for gp in plan.groups:
        positions = gp.removed
        if gp.group.selection is not None:  # positions within the selected channels
            positions = model.get_submodule(gp.group.selection).indices.cpu()[positions]
            removed.setdefault(gp.group.bn, []).append(positions)
            continue
        for bn in gp.group.bns:
            removed.setdefault(bn, []).append(positions)
    return {bn: torch.cat(p).unique() for bn, p in removed.items()}


def gamma_zeroed(model: nn.Module, plan: ChannelPlan) -> nn.Module:
    """A copy of `model` with γ zeroed at every removed channel: what `exact` pruning must equal."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for bn, positions in removed_positions(model, plan).items():
            ref.get_submodule(bn).weight[positions.to(ref.get_submodule(bn).weight.device)] = 0
    return ref


def compensation(model: nn.Module, plan: ChannelPlan, mode: str) -> Compensation:
    """The terms each consumer of a removed channel gains (computed on the unpruned `model`)."""
    if mode not in COMPENSATE_MODES:
        raise ValueError(f"compensate must be one of {', '.join(COMPENSATE_MODES)}, got {mode!r}")
    result = Compensation()
    if mode == "none":
        return result
    for gp in plan.groups:
        for consumer in gp.group.consumers:
            if not consumer.constant and gp.kept < gp.total:
                result.notes.append(f"{consumer.module!r} not compensated: removed channels of {gp.group.bn!r} reach "
                                    "it through an op that does not keep a constant constant")
    reads = _removed_reads(plan)
    if not reads:
        return result
    inputs = _consumer_inputs(gamma_zeroed(model, plan), sorted(reads))
    for name, columns in reads.items():
        if name not in inputs:  # it never ran: a training-only branch such as GoogLeNet's auxiliary heads
            result.notes.append(f"{name!r} not compensated: it does not run in eval mode")
            continue
        term, why = _term(model.get_submodule(name), inputs[name], columns, mode)
        if why is not None:
            result.notes.append(f"{name!r} not compensated: {why}")
        elif term is not None:
            result.terms[name] = term
    return result


def apply_compensation(pruned: nn.Module, comp: Compensation, out_keep: dict[str, torch.Tensor]) -> None:
    """Add each term to its (already resized) layer, keeping the rows of its surviving outputs."""
    for name, term in comp.terms.items():
        layer = pruned.get_submodule(name)
        rows = out_keep.get(name)
        bias = term.bias if rows is None else term.bias[rows]
        kernel = term.kernel if rows is None or term.kernel is None else term.kernel[rows]
        if kernel is None and layer.bias is not None:  # a per-channel term is the layer's own bias
            with torch.no_grad():
                layer.bias.add_(bias.to(layer.bias))
        else:
            attach_response(layer, bias=bias, kernel=kernel)


# --------------------------------------------------------------------------- measuring the constants


def _removed_reads(plan: ChannelPlan) -> dict[str, torch.Tensor]:
    """Consumer name → the input columns at which it reads removed channels (constant consumers only)."""
    reads: dict[str, list[torch.Tensor]] = {}
    for gp in plan.groups:
        if gp.kept == gp.total:
            continue
        removed = gp.removed
        for consumer in gp.group.consumers:
            if not consumer.constant:
                continue
            cols = (consumer.offset + removed[:, None] * consumer.repeat + torch.arange(consumer.repeat)).flatten()
            reads.setdefault(consumer.module, []).append(cols)
    return {name: torch.cat(c).unique() for name, c in reads.items()}


@torch.no_grad()
def _consumer_inputs(ref: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """What each named layer reads in one eval forward pass of `ref` (batch 2, random input)."""
    captured: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            captured[name] = args[0].detach()  # in the model's own dtype: float64 stays exact
        return hook

    handles = [ref.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    weight = next(ref.parameters())  # the probe matches the model's device and dtype
    generator = torch.Generator().manual_seed(0)
    try:
        ref.eval()(torch.randn(2, *input_size(ref), generator=generator).to(weight))
    finally:
        for h in handles:
            h.remove()
    return captured


def _term(layer: nn.Module, x: torch.Tensor, columns: torch.Tensor, mode: str) -> tuple[Term | None, str | None]:
    """(the term, None), or (None, why not)."""
    values = x[:, columns.to(x.device)]
    if isinstance(layer, nn.Linear):
        const = values[0]
        if not _constant(values, const.unsqueeze(0)):
            return None, "the removed columns it reads differ between inputs"
        weight = layer.weight.detach()[:, columns.to(layer.weight.device)]
        return Term(bias=(weight @ const.to(weight)).cpu()), None
    if not isinstance(layer, nn.Conv2d) or values.dim() != 4:
        return None, f"a {type(layer).__name__} consumer"
    if layer.groups != 1:
        return None, "a grouped conv consumer"
    if layer.padding_mode != "zeros":
        return None, f"padding_mode {layer.padding_mode!r}"
    const = values[0, :, 0, 0]
    if not _constant(values, const[None, :, None, None]):
        return None, "the removed channels it reads are not constant over the batch and the map"
    weight = layer.weight.detach()[:, columns.to(layer.weight.device)]
    kernel = (weight * const.to(weight)[None, :, None, None]).sum(1).cpu()  # [out, kh, kw]
    if all(p == 0 for p in layer.padding):  # every output position sees every tap: uniform
        return Term(bias=kernel.sum((1, 2))), None
    if mode == "exact":
        return Term(bias=torch.zeros(kernel.shape[0], dtype=kernel.dtype), kernel=kernel), None
    # bias: the spatial mean of the exact map at the size this layer reads
    ones = torch.ones(1, 1, *x.shape[-2:], dtype=kernel.dtype)
    response = nn.functional.conv2d(ones, kernel.unsqueeze(1), stride=layer.stride, padding=layer.padding,
                                    dilation=layer.dilation)[0]
    return Term(bias=response.mean((1, 2))), None


def _constant(values: torch.Tensor, const: torch.Tensor) -> bool:
    scale = 1.0 + float(const.abs().max()) if const.numel() else 1.0
    return bool(((values - const).abs().max() <= 1e-4 * scale).item()) if values.numel() else True
