"""Network slimming inside your own training loop: trace once, add the sparsity term each step, prune.

    slim = Slimming(model, example_input, sparsity=1e-4)   # the channel groups, traced once
    for x, y in loader:                                     # your loop, your optimizer
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        slim.regularize(optimizer)                          # grad(γ) += λ·sign(γ), one fused op
        optimizer.step(); optimizer.zero_grad()
        slim.clamp()                                        # polarization only: γ into [0, bound]
    pruned = slim.prune(ratio=0.5)                          # Pruned(model, plan, exactness, notes)

The same groups, plan, compensation and measurement as `slimctl prune`; the CLI's trainer is not
involved. `regularize` is safe under DistributedDataParallel (call it after `backward`, when the γ
gradients are already averaged over ranks: every rank then adds the same term to the same γ) and
with a GradScaler (pass it: the gradients are unscaled first, as for gradient clipping).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from slimctl.base.groups import ranked_bns
from slimctl.base.registry import input_size as recorded_input_size
from slimctl.core.recalibrate import recalibrate_bn
from slimctl.core.sparsity import REGULARIZERS, SparsityTerm, bn_scales, gamma_stats, sparsity_for_budget
from slimctl.core.plan import make_plan
from slimctl.core.surgery import Pruned, measured_prune
from slimctl.core.targets import parse_target, plan_for_target
from slimctl.errors import SlimctlError
from slimctl.models.layers import unwrap
from slimctl.trace import channel_groups


class Slimming:
    """Network slimming for a model you train yourself.

    `example_input`: one batch (or one image's shape, (C, H, W)) the model is traced with and its
    FLOPs counted at. The strength is λ (`sparsity`, the paper's 1e-4 by default) or an L1 budget
    (`budget` = λ·Σ lr over the run, what slimctl's recipes state, with `lr_sum` the sum of the
    learning rate over every step you will take). `coupled`: residual-coupled channels kept (the
    paper) or pruned together ranked by `max` / `mean` / `sum` of their BNs' |γ|. `regularizer`:
    `l1` (the paper's) or `polarization` with its `polarization_t` and `gamma_bound`, as the
    `train.*` keys of the same names (call `clamp()` after each optimizer step then).

    Create it before wrapping the model in DistributedDataParallel: tracing may insert a
    ChannelSelection module where a BN feeds a concatenation or a residual sum.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor | tuple[int, ...], *,
                 sparsity: float | None = None, budget: float | None = None, lr_sum: float | None = None,
                 coupled: str = "keep", regularizer: str = "l1", polarization_t: float = 1.0,
                 gamma_bound: float = 1.0) -> None:
        self.model = unwrap(model)
        shape = tuple(example_input.shape[1:]) if isinstance(example_input, torch.Tensor) else tuple(example_input)
        if len(shape) != 3:
            raise SlimctlError(f"example_input: expected a batch (N, C, H, W) or a shape (C, H, W), got {shape}")
        spec = getattr(self.model, "arch_spec", None)
        if spec is None:  # a model slimctl did not build: its own class, named when it is saved
            self.model.arch_spec = {"arch": None, "num_classes": None, "arch_args": {}, "input_size": list(shape)}
        elif recorded_input_size(self.model) != shape:
            self.model.arch_spec = {**spec, "input_size": list(shape)}
        if budget is not None:
            if lr_sum is None or lr_sum <= 0 or sparsity is not None:
                raise SlimctlError("budget needs lr_sum (> 0: the learning rate summed over every step) and no "
                                   "sparsity: the budget sets λ = budget / lr_sum")
            sparsity = sparsity_for_budget(budget, lr_sum)
        elif sparsity is None:
            sparsity = 1e-4  # the paper's VGG λ
        if not sparsity >= 0:
            raise SlimctlError(f"sparsity must be >= 0, got {sparsity!r}")
        if regularizer not in REGULARIZERS or not (math.isfinite(polarization_t) and polarization_t > 0
                                                   and math.isfinite(gamma_bound) and gamma_bound > 0):
            raise SlimctlError(f"regularizer must be one of {', '.join(REGULARIZERS)}, with a finite polarization_t "
                               f"and gamma_bound > 0; got {regularizer!r}, {polarization_t!r}, {gamma_bound!r}")
        self.sparsity, self.coupled = float(sparsity), coupled
        self.term = SparsityTerm(self.sparsity, regularizer, float(polarization_t), float(gamma_bound))
        self.planned_budget = None if lr_sum is None else self.sparsity * lr_sum
        self.groups = channel_groups(self.model, coupled=coupled)
        if not self.groups:
            raise SlimctlError(f"{type(self.model).__name__} has no prunable channel groups (no BatchNorm2d after a "
                               "conv whose channels could be removed): nothing to slim")
        self.gammas = bn_scales(self.model, ranked_bns(self.groups))
        self.applied_budget = 0.0  # λ·Σ lr over the steps regularized so far
        self._lr_group: tuple[torch.optim.Optimizer, dict] | None = None  # (optimizer, the group holding γ)

    def regularize(self, optimizer: torch.optim.Optimizer, *, scaler: torch.amp.GradScaler | None = None) -> None:
        """grad(γ) += λ·∂R/∂γ (L1: λ·sign(γ)) on every ranked BN scale, after `backward` and before `optimizer.step`.
        No host sync; the learning rate is read from the optimizer group that holds the first γ."""
        if scaler is not None and scaler.is_enabled():
            try:
                scaler.unscale_(optimizer)
            except RuntimeError:  # already unscaled for this step (e.g. for clipping): nothing to do
                pass
        with_grads = [g for g in self.gammas if g.grad is not None]
        self.term.add_grad(with_grads)
        if self._lr_group is None or self._lr_group[0] is not optimizer:  # found once per optimizer, not per step
            first = self.gammas[0]
            group = next((g for g in optimizer.param_groups if any(p is first for p in g["params"])), {"lr": 0.0})
            self._lr_group = (optimizer, group)
        self.applied_budget += self.sparsity * float(self._lr_group[1]["lr"])

    def clamp(self) -> None:
        """After `optimizer.step`: polarization keeps every ranked γ in [0, gamma_bound]; L1 does nothing."""
        self.term.after_step(self.gammas)

    def strength(self) -> dict[str, Any]:
        """λ, the L1 budget planned (when `lr_sum` was given) and the one applied so far, and the |γ| statistics."""
        return {"sparsity": self.sparsity, "l1_budget_planned": self.planned_budget,
                "l1_budget_applied": self.applied_budget, **gamma_stats(self.gammas)}

    def prune(self, ratio: float | None = None, *, target_flops: float | str | None = None,
              target_params: float | str | None = None, compensate: str = "exact", min_channels: int = 1,
              round_to: int = 1, recalibrate: Iterable | None = None) -> Pruned:
        """The narrower model (eval mode; the model you trained is unchanged): at `ratio` of the ranked
        channels, or the smallest ratio that removes `target_flops` / `target_params` (a fraction like
        0.5, or a count like "400M"). `recalibrate`: a loader of (x, y) batches whose images
        re-estimate the BN statistics after the cut. Returns Pruned(model, plan, exactness, notes),
        what `slimctl prune` prints and records."""
        targets = [(kind, value) for kind, value in (("flops", target_flops), ("params", target_params))
                   if value is not None]
        if (ratio is None) == (not targets) or len(targets) > 1:
            raise SlimctlError("give one of ratio, target_flops or target_params")
        training = self.model.training
        self.model.eval()
        try:  # the groups traced at construction, not a second trace
            if ratio is not None:
                plan = make_plan(self.model, self.groups, ratio, min_channels=min_channels, round_to=round_to)
            else:
                kind, value = targets[0]
                plan, _ = plan_for_target(self.model, self.groups, parse_target(kind, str(value)),
                                          min_channels=min_channels, round_to=round_to, compensate=compensate)
            result = measured_prune(self.model, plan, compensate=compensate)
        finally:
            self.model.train(training)
        if recalibrate is not None:
            device = next(result.model.parameters()).device
            recalibrate_bn(result.model, ((x.to(device), y) for x, y in recalibrate), device=device)
        return result
