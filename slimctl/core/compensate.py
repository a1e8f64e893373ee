"""β-compensated removal: what a removed channel still emitted is carried into the layers that read it.

After sparse training a channel with γ ≈ 0 outputs the constant β (its BN: γ·x̂ + β). Literal
removal (the paper's, `none`) drops what the next layers read of it and shifts every later
activation; strongly sparsified networks use such channels as biases, so the accuracy right after
pruning collapses. Here each consumer keeps that input's response. A consumer reads a removed channel as

- c, a constant (after activations, max pools, concatenations, …): its response is the layer's own
  operator applied to c over the map (`operators.layer_operator`: groups, stride, dilation, padding
  mode, run-time 'same' padding) — a per-channel bias for a Linear or a conv that reads it alike
  everywhere, a per-position map near zero-padded borders;
- c·P, after stride-1 average pools that count zero padding (P: those pools on an all-ones map,
  smaller at the borders): the same, with P for the ones;
- c·g(x), after a squeeze-and-excitation gate g: the gate's layer keeps its removed rows
  (`inserted.GateRows`) and the consumer adds W[:, removed]·(c ⊙ g_removed(x)) every forward.

A channel whose c is 0 (β ≤ 0 before a ReLU; β = 0 before SiLU or hard-swish) adds nothing, and a
consumer that reads only such channels gets no term: nothing runs for it each forward.

Modes: `exact` keeps all of it, so the pruned model equals the original with only the removed
channels' γ zeroed; `bias` keeps the spatial mean at the model's input size (a plain bias: exact for
Linear and unpadded consumers, lossy near padded borders; gates stay exact); `none` nothing (the
pruned model equals the original with γ and β zeroed).

Nothing is taken on trust: c (and P, g) are what a forward pass of the γ-zeroed original feeds
each consumer, and every term is checked against it (same over the batch, the expected shape over
space). A group whose removed channels some consumer reads in a way no term reproduces is kept
whole, with the reason in the notes (`Compensation.keep`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from slimctl.base.groups import Consumer
from slimctl.base.gates import GATE_CODES, GateRows, apply_gate, attach_gate_rows, gate_functions, gate_rows_of
from slimctl.base.inserted import attach_response, link_gates, response_of
from slimctl.base.operators import kernel_response, profile_map, zero_padded
from slimctl.core.plan import ChannelPlan
from slimctl.base.registry import input_size

COMPENSATE_MODES = ("exact", "bias", "none")
TOLERANCE = 1e-4  # relative: a measured input agrees with its term's model (float32 rounding is ~1e-7)


@dataclass
class Term:
    """What one layer gains from the removed channels it read, over all of its output channels."""

    bias: torch.Tensor  # [out]
    kernel: torch.Tensor | None = None  # [out, kh, kw]: on an all-ones map (exact mode, padded convs)
    pkernel: torch.Tensor | None = None  # [out, kh, kw]: on the profile map
    profile: torch.Tensor | None = None  # [n, 4]
    gate_weight: torch.Tensor | None = None  # [out, k, kh, kw]: on the gate values
    gate_source: str | None = None


@dataclass
class GateTerm:
    """The rows of a gate's logits layer for its removed channels (`inserted.GateRows`)."""

    weight: torch.Tensor  # [k, in, kh, kw] or [k, in]
    bias: torch.Tensor  # [k]
    ops: torch.Tensor  # [n, 3]
    sink: str  # the consumer that reads c·g


@dataclass
class Compensation:
    terms: dict[str, Term] = field(default_factory=dict)
    gates: dict[str, GateTerm] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # consumers that could not be compensated, and why
    keep: set[int] = field(default_factory=set)  # plan.groups indices to keep whole (not compensable)


@dataclass(frozen=True)
class _Read:
    """Removed channels of one plan group that one consumer reads the same way."""

    group: int  # index in plan.groups
    columns: torch.Tensor  # the consumer's input columns
    positions: torch.Tensor  # the channels' positions in their space (a gate layer's rows)
    consumer: Consumer


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
        for bn, offset, _ in gp.group.slices:
            removed.setdefault(bn, []).append(positions + offset)
    return {bn: torch.cat(p).unique() for bn, p in removed.items()}


def gamma_zeroed(model: nn.Module, plan: ChannelPlan, *, beta: bool = False) -> nn.Module:
    """A copy of `model` with γ (and with `beta`, β) zeroed at every removed channel: what `exact`
    (`none`) pruning must equal."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for bn, positions in removed_positions(model, plan).items():
            module = ref.get_submodule(bn)
            module.weight[positions.to(module.weight.device)] = 0
            if beta:
                module.bias[positions.to(module.bias.device)] = 0
    return ref


def compensation(model: nn.Module, plan: ChannelPlan, mode: str) -> Compensation:
    """The terms each consumer of a removed channel gains (computed on the unpruned `model`)."""
    if mode not in COMPENSATE_MODES:
        raise ValueError(f"compensate must be one of {', '.join(COMPENSATE_MODES)}, got {mode!r}")
    result = Compensation()
    if mode == "none":
        return result
    reads = _removed_reads(plan, result)
    if not reads:
        return result
    gate_layers = sorted({r.consumer.gate[0] for rs in reads.values() for r in rs if r.consumer.gate})
    captured = _captured(gamma_zeroed(model, plan), sorted(reads), gate_layers)
    for name, layer_reads in reads.items():
        if name not in captured:  # it never ran: a training-only branch such as GoogLeNet's auxiliary heads
            result.notes.append(f"{name!r} not compensated: it does not run in eval mode")
            continue
        why = _add_term(result, model, name, layer_reads, captured, mode)
        if why is not None:
            result.keep.update(r.group for r in layer_reads)
            result.notes.append(f"{name!r} cannot be compensated ({why}): the channels it would lose are kept")
    return result


def apply_compensation(pruned: nn.Module, comp: Compensation, out_keep: dict[str, torch.Tensor]) -> None:
    """Add each term to its (already resized) layer, keeping the rows of its surviving outputs, and
    each gate's removed rows to its layer (after the rows an earlier prune left there)."""
    for name, term in comp.terms.items():
        layer = pruned.get_submodule(name)
        rows = out_keep.get(name)
        take = (lambda t: t) if rows is None else (lambda t: t[rows.to(t.device)])
        per_channel = term.kernel is None and term.pkernel is None and term.gate_weight is None
        if term.gate_weight is None and not any(bool(take(t).any()) for t in (term.bias, term.kernel, term.pkernel)
                                                if t is not None):
            continue  # its removed inputs reached only removed outputs (a grouped conv's dropped groups)
        if per_channel and layer.bias is not None and response_of(layer) is None:  # the layer's own bias
            with torch.no_grad():
                layer.bias.add_(take(term.bias).to(layer.bias))
            continue
        attach_response(layer, bias=take(term.bias),
                        kernel=None if term.kernel is None else take(term.kernel),
                        pkernel=None if term.pkernel is None else take(term.pkernel), profile=term.profile,
                        gate_weight=None if term.gate_weight is None else take(term.gate_weight),
                        gate_source=term.gate_source)
    for name, gate in comp.gates.items():
        layer = pruned.get_submodule(name)
        old = gate_rows_of(layer)
        weight, bias = gate.weight, gate.bias
        if old is not None:  # an earlier prune's rows first: the consumer's gated columns are in that order
            weight, bias = torch.cat([old.weight, weight.to(old.weight)]), torch.cat([old.bias, bias.to(old.bias)])
        rows = GateRows(weight.shape[0], weight.shape[1], *(weight.shape[2:] if weight.dim() == 4 else (0, 0)),
                        gate.ops.shape[0], *gate.sink.encode())
        with torch.no_grad():
            rows.weight.copy_(weight)
            rows.bias.copy_(bias)
            rows.ops.copy_(gate.ops)
        rows.refresh()
        attach_gate_rows(layer, rows.to(layer.weight.dtype))
    link_gates(pruned)


# --------------------------------------------------------------------------- what each consumer reads


def _removed_reads(plan: ChannelPlan, result: Compensation) -> dict[str, list[_Read]]:
    """Consumer name → its reads of removed channels; a consumer that reads them as a plain
    non-constant (no gate either) keeps its group whole (noted in `result`)."""
    reads: dict[str, list[_Read]] = {}
    for i, gp in enumerate(plan.groups):
        if gp.kept == gp.total:
            continue
        removed = gp.removed
        for consumer in gp.group.consumers:
            if not consumer.constant and consumer.gate is None:
                result.keep.add(i)
                result.notes.append(f"{consumer.module!r} cannot be compensated (removed channels of "
                                    f"{gp.group.bn!r} reach it through an op that does not keep a constant "
                                    "constant): the channels it would lose are kept")
                continue
            cols = (consumer.offset + removed[:, None] * consumer.repeat + torch.arange(consumer.repeat)).flatten()
            reads.setdefault(consumer.module, []).append(_Read(i, cols, removed, consumer))
    return reads


@torch.no_grad()
def _captured(ref: nn.Module, consumers: list[str], gate_layers: list[str]) -> dict[str, torch.Tensor]:
    """In one eval forward pass of `ref` (batch 2, random input at the model's size): what each
    consumer reads (its input) and what each gate layer computes (its output, `<name>:out`)."""
    captured: dict[str, torch.Tensor] = {}

    def reads(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            captured[name] = args[0].detach().clone()  # in the model's own dtype: float64 stays exact
        return hook

    def computes(name: str):
        def hook(_module: nn.Module, _args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            captured[f"{name}:out"] = output.detach().clone()
        return hook

    handles = [ref.get_submodule(n).register_forward_pre_hook(reads(n)) for n in consumers]
    handles += [ref.get_submodule(n).register_forward_hook(computes(n)) for n in gate_layers]
    weight = next(ref.parameters())  # the probe matches the model's device and dtype
    generator = torch.Generator().manual_seed(0)
    try:
        ref.eval()(torch.randn(2, *input_size(ref), generator=generator).to(weight))
    finally:
        for h in handles:
            h.remove()
    return captured


def _add_term(result: Compensation, model: nn.Module, name: str, reads: list[_Read],
              captured: dict[str, torch.Tensor], mode: str) -> str | None:
    """Measure what `name` reads at the removed columns, fit each read's model (c, c·P, c·g) and add
    the layer's term (and gate rows) to `result`; or why that is not possible."""
    layer, x = model.get_submodule(name), captured[name]
    if isinstance(layer, nn.Linear):
        if any(r.consumer.gate for r in reads):
            return "a gated input read by a Linear"
        columns = torch.cat([r.columns for r in reads]).to(x.device)
        values = x[:, columns]
        if not _close(values, values[:1]):
            return "the removed columns it reads differ between inputs"
        if bool(values[0].any()):  # removed channels that read 0 add nothing (no term, nothing to run)
            weight = layer.weight.detach()[:, columns.to(layer.weight.device)]
            result.terms[name] = Term(bias=(weight @ values[0].to(weight)).cpu())
        return None
    if not isinstance(layer, nn.Conv2d) or x.dim() != 4:
        return f"a {type(layer).__name__} consumer"
    existing = response_of(layer)
    term = Term(bias=torch.zeros(layer.out_channels, dtype=layer.weight.dtype))
    for read in reads:
        values = x[:, read.columns.to(x.device)]
        if read.consumer.gate is not None:
            why = _gate_term(result, term, model, name, read, values, captured)
        elif read.consumer.profile:
            why = _profile_term(term, layer, read, values, existing, mode)
        else:
            why = _constant_term(term, layer, read, values, mode)
        if why is not None:
            return why
    if term.gate_weight is not None or term.kernel is not None or term.pkernel is not None or bool(term.bias.any()):
        result.terms[name] = term  # else every removed channel it reads is 0: no term to run each forward
    return None


def _constant_term(term: Term, layer: nn.Conv2d, read: _Read, values: torch.Tensor, mode: str) -> str | None:
    """c read alike everywhere: a bias where the layer reads a constant alike, else the kernel term."""
    const = values[0, :, :1, :1]
    if not _close(values, const.unsqueeze(0)):
        return "the removed channels it reads are not constant over the batch and the map"
    if not bool(const.any()):  # 0 (β ≤ 0 before a ReLU, β = 0 before SiLU): the removal is exact as it is
        return None
    kernel = _reduced_kernel(layer, read.columns, const.flatten())
    if not zero_padded(layer):
        term.bias += kernel.sum((1, 2))
    elif mode == "exact":
        term.kernel = kernel if term.kernel is None else term.kernel + kernel
    else:
        ones = torch.ones(1, 1, *values.shape[-2:], dtype=layer.weight.dtype, device=layer.weight.device)
        term.bias += kernel_response(layer, kernel.to(layer.weight), ones).mean((1, 2)).cpu()
    return None


def _profile_term(term: Term, layer: nn.Conv2d, read: _Read, values: torch.Tensor, existing, mode: str) -> str | None:
    """c·P after zero-padded stride-1 average pools: fit c against P, then a kernel on P."""
    profile = torch.tensor(read.consumer.profile, dtype=torch.long)
    if term.profile is not None and not torch.equal(term.profile, profile) or (
            existing is not None and "profile" in existing._buffers and not torch.equal(existing.profile, profile)):
        return "inputs after different zero-padded average pools"
    shape = profile_map(read.consumer.profile, tuple(values.shape[-2:]), values)[0, 0]  # [H, W]
    const = (values[0] * shape).sum((1, 2)) / (shape * shape).sum()  # least squares, per channel
    if not _close(values, const[None, :, None, None] * shape):
        return "the removed channels it reads do not follow the average pools' profile"
    if not bool(const.any()):
        return None
    kernel = _reduced_kernel(layer, read.columns, const)
    if mode == "exact":
        term.pkernel = kernel if term.pkernel is None else term.pkernel + kernel
        term.profile = profile
    else:
        response = kernel_response(layer, kernel.to(layer.weight), shape[None, None].to(layer.weight))
        term.bias += response.mean((1, 2)).cpu()
    return None


def _gate_term(result: Compensation, term: Term, model: nn.Module, name: str, read: _Read, values: torch.Tensor,
               captured: dict[str, torch.Tensor]) -> str | None:
    """c·g(x): fit c against the gate values the γ-zeroed original computed, keep the gate layer's
    removed rows, and W[:, removed]·c as the consumer's gated columns."""
    source, ops = read.consumer.gate
    layer, gate_layer = model.get_submodule(name), model.get_submodule(source)
    if layer.groups != 1:
        return "a gated input read by a grouped conv"
    if source in result.gates or term.gate_source not in (None, source):
        return f"gate {source!r} read by more than one consumer, or several gates read by one"
    codes = torch.tensor([[GATE_CODES.index(op), a, b] for op, a, b in ops], dtype=torch.float64).reshape(-1, 3)
    logits = captured[f"{source}:out"][:, read.positions.to(values.device)]
    gate = apply_gate(logits.to(torch.float64), gate_functions(codes))
    if gate.dim() == 2:  # a Linear's logits: one value per sample and channel
        gate = gate.reshape(*gate.shape, *([1] * (values.dim() - 2)))
    gate = gate.to(values.dtype).expand_as(values)
    spread = (gate * gate).sum((0, 2, 3))
    if bool((spread <= 1e-12).any()):
        return f"gate {source!r} is zero for a removed channel on the probe batch"
    const = (values * gate).sum((0, 2, 3)) / spread  # least squares, per channel
    if not _close(values, const[None, :, None, None] * gate):
        return f"the removed channels it reads are not a constant times gate {source!r}"
    # Only channels whose constant is not 0 reach the consumer (c·g = 0 otherwise): each gate row
    # kept costs every forward, so those are all the term keeps.
    nonzero = (const != 0).cpu()
    if not bool(nonzero.any()):
        return None
    columns, positions, const = read.columns[nonzero], read.positions[nonzero], const[nonzero.to(const.device)]
    weight = layer.weight.detach()[:, columns.to(layer.weight.device)]
    term.gate_weight = weight * const.to(weight)[None, :, None, None]
    term.gate_source = source
    rows = gate_layer.weight.detach()[positions.to(gate_layer.weight.device)]
    bias = gate_layer.bias.detach()[positions] if gate_layer.bias is not None else torch.zeros(rows.shape[0])
    result.gates[source] = GateTerm(weight=rows.cpu(), bias=bias.cpu(), ops=codes.float(), sink=name)
    return None


def _reduced_kernel(layer: nn.Conv2d, columns: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
    """[out, kh, kw]: Σ over the removed input columns c that output o reads (its group's) of
    W[o, c]·const_c — the layer's response to the constants is this kernel on an all-ones map."""
    weight = layer.weight.detach()
    groups, per_group = layer.groups, weight.shape[1]
    coeff = torch.zeros(groups, per_group, dtype=weight.dtype, device=weight.device)
    columns = columns.to(weight.device)
    coeff[columns // per_group, columns % per_group] = const.to(weight)
    coeff = coeff.repeat_interleave(weight.shape[0] // groups, dim=0)  # [out, in per group]
    return (weight * coeff[:, :, None, None]).sum(1).cpu()


def _close(values: torch.Tensor, model: torch.Tensor) -> bool:
    """`values` agree with their model everywhere (relative to the model's scale)."""
    if not values.numel():
        return True
    scale = 1.0 + float(model.abs().max())
    return bool(((values - model).abs().max() <= TOLERANCE * scale).item())
