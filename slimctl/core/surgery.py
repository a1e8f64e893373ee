"""Apply a channel plan: a new, physically narrower model with the kept weights copied by name.

Works on any model whose groups name Conv2d / BatchNorm2d / Linear / ChannelSelection modules;
nothing here knows a family. The input model is left untouched.

Invariants (tested), in eval mode: with `compensate="exact"` (the default) the pruned model computes
what the original computes after zeroing γ of every removed channel (what sparse training drives
them to); with `compensate="none"` (the paper's literal removal), what it computes after zeroing
γ and β. See `slimctl.core.compensate`.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from slimctl.core.compensate import apply_compensation, compensation
from slimctl.core.exactness import Exactness, measure_exactness
from slimctl.base.gates import GATE, attach_gate_rows
from slimctl.base.inserted import COMPENSATE, ChannelSelection, attach
from slimctl.models.layers import replace_module, resized
from slimctl.core.plan import ChannelPlan, make_plan, plan_masks
from slimctl.trace import channel_groups


def apply_plan(model: nn.Module, plan: ChannelPlan, *, compensate: str = "exact") -> nn.Module:
    """The narrower model; `compensate` (exact | bias | none) says what removed channels' constants become."""
    return apply_plan_with_notes(model, plan, compensate=compensate)[0]


def apply_plan_with_notes(model: nn.Module, plan: ChannelPlan, *, compensate: str = "exact") -> tuple[nn.Module, list[str]]:
    """`apply_plan`, plus what could not be compensated and why."""
    return applied_plan(model, plan, compensate=compensate)[:2]


def applied_plan(model: nn.Module, plan: ChannelPlan, *, compensate: str = "exact"
                 ) -> tuple[nn.Module, list[str], ChannelPlan]:
    """(the narrower model, what could not be compensated and why, the plan applied). A group whose
    removed channels some consumer cannot be compensated for is kept whole (in `exact` and `bias`
    modes), so the pruned model stays what the mode promises; the plan applied says so."""
    comp = compensation(model, plan, compensate)
    notes = list(comp.notes)
    while comp.keep:  # keeping a group changes no other group's reads, but re-measure all the same
        plan = plan.keeping(comp.keep)
        comp = compensation(model, plan, compensate)
        notes += [n for n in comp.notes if n not in notes]
    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    out_keep, in_mask, selections = plan_masks(modules, plan)

    for name, keep in selections.items():
        selection = modules[name]
        assert isinstance(selection, ChannelSelection)
        selection.indices = selection.indices[keep.to(selection.indices.device)]

    for name in sorted(set(out_keep) | set(in_mask)):
        in_idx = in_mask[name].nonzero().flatten() if name in in_mask else None
        new = _sliced(modules[name], out_keep.get(name), in_idx)
        replace_module(pruned, name, new.train(modules[name].training))  # a fresh module is in train mode
    apply_compensation(pruned, comp, out_keep)
    return pruned, notes, plan


def _sliced(module: nn.Module, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None) -> nn.Module:
    """A resized copy of `module` holding only the rows `out_idx` and the columns `in_idx`; what an
    earlier prune inserted into it comes along: a constant response keeps the rows of its surviving
    outputs, a gate's removed rows read the surviving inputs."""
    inserted = {child: module._modules[child] for child in (COMPENSATE, GATE) if child in module._modules}
    state = {k: v.detach() for k, v in module.state_dict().items() if k.split(".")[0] not in inserted}
    new = _sliced_layer(module, state, out_idx, in_idx)
    response = inserted.get(COMPENSATE)
    if response is not None:
        attach(new, response if out_idx is None else response.take_rows(out_idx))
    rows = inserted.get(GATE)
    if rows is not None:
        rows = copy.deepcopy(rows)
        if in_idx is not None:
            rows.weight = rows.weight[:, in_idx.to(rows.weight.device)]
        attach_gate_rows(new, rows)
    return new


def _sliced_layer(module: nn.Module, state: dict[str, torch.Tensor], out_idx: torch.Tensor | None,
                  in_idx: torch.Tensor | None) -> nn.Module:
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        # weight, bias, running_mean, running_var are per channel; num_batches_tracked is a scalar.
        state = {k: v if v.dim() == 0 else v[out_idx.to(v.device)] for k, v in state.items()}
        return _loaded(resized(module, [len(out_idx)]), state)
    if isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels:
        # Depthwise: one filter per channel, the space passes through: in = out = groups = kept.
        idx = out_idx if out_idx is not None else in_idx
        state = {k: v[idx.to(v.device)] for k, v in state.items()}
        return _loaded(resized(module, [len(idx)] * 3), state)
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        return _sliced_grouped(module, state, out_idx, in_idx)
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        if out_idx is not None:
            state = {k: v[out_idx.to(v.device)] for k, v in state.items()}  # weight rows, bias
        if in_idx is not None:
            state["weight"] = state["weight"][:, in_idx.to(state["weight"].device)]
        out_c, in_c = state["weight"].shape[:2]
        shape = [in_c, out_c, 1] if isinstance(module, nn.Conv2d) else [in_c, out_c]
        return _loaded(resized(module, shape), state)
    raise TypeError(f"surgery cannot resize {type(module).__name__}")


def _sliced_grouped(
    module: nn.Conv2d, state: dict[str, torch.Tensor], out_idx: torch.Tensor | None, in_idx: torch.Tensor | None
) -> nn.Module:
    """A grouped conv keeps the same number of input (and output) channels in every group it keeps;
    each kept output row then reads its own group's kept input columns (which may differ between
    groups). A group whose channels all go on both sides is dropped (`slimctl.core.grouped`)."""
    g, weight = module.groups, state["weight"]
    in_pg, out_pg = module.in_channels // g, module.out_channels // g
    out_idx = torch.arange(module.out_channels) if out_idx is None else out_idx.cpu()
    in_idx = torch.arange(module.in_channels) if in_idx is None else in_idx.cpu()
    in_counts, out_counts = torch.bincount(in_idx // in_pg, minlength=g), torch.bincount(out_idx // out_pg, minlength=g)
    kept = in_counts > 0
    if not torch.equal(kept, out_counts > 0) or not bool(kept.any()):
        raise TypeError(f"grouped conv {module} must keep input and output channels in the same groups")
    for counts, what in ((in_counts, "input"), (out_counts, "output")):
        if not bool((counts[kept] == counts[kept][0]).all()):
            raise TypeError(f"grouped conv {module} must keep the same number of {what} channels per group")
    local = (in_idx % in_pg).view(int(kept.sum()), -1)  # kept input columns, per kept group, within its filter
    rank = torch.cumsum(kept, 0) - 1  # a kept group's position among the kept ones
    cols = local[rank[out_idx // out_pg]].to(weight.device)  # [kept out, kept in per group]
    rows = weight[out_idx.to(weight.device)]
    state["weight"] = torch.gather(rows, 1, cols[:, :, None, None].expand(-1, -1, *rows.shape[2:]))
    if "bias" in state:
        state["bias"] = state["bias"][out_idx.to(state["bias"].device)]
    return _loaded(resized(module, [len(in_idx), len(out_idx), int(kept.sum())]), state)


def _loaded(new: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    new.load_state_dict({k: v.clone() for k, v in state.items()})
    return new


class Pruned(NamedTuple):
    model: nn.Module  # the narrower model (in the input model's train/eval mode)
    plan: ChannelPlan  # the plan applied (groups that could not be compensated are kept whole)
    exactness: Exactness  # the pruned model against its promise, measured on a probe batch
    notes: list[str]  # what could not be compensated, and why


def prune_model(
    model: nn.Module, ratio: float, *, min_channels: int = 1, round_to: int = 1, compensate: str = "exact",
    coupled: str = "keep",
) -> Pruned:
    """Network slimming in one call: the model's channel groups (`coupled`: residual-coupled spaces
    kept, or pruned together ranked by max / mean / sum) → global-threshold plan → surgery, then the
    result measured against what `compensate` promises (`slimctl.core.exactness`)."""
    groups = channel_groups(model, coupled=coupled)
    return measured_prune(model, make_plan(model, groups, ratio, min_channels=min_channels, round_to=round_to),
                          compensate=compensate)


def measured_prune(model: nn.Module, plan: ChannelPlan, *, compensate: str = "exact") -> Pruned:
    """`plan` applied (groups that cannot be compensated kept whole) and the result measured against
    what `compensate` promises: Pruned(model, plan applied, exactness, notes)."""
    pruned, notes, plan = applied_plan(model, plan, compensate=compensate)
    return Pruned(pruned, plan, measure_exactness(model, pruned, plan, compensate), notes)
