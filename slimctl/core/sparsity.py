"""The sparsity term on BatchNorm scales, applied as a subgradient after `backward()` and before `step()`.

- l1, the paper's: λ·Σ|γ|, so grad(γ) += λ·sign(γ), one fused foreach op over every ranked BN
  (γ only, never β).
- polarization (Zhuang et al., "Neuron-level Structured Pruning using Polarization Regularizer",
  NeurIPS 2020): λ·R(γ), R(γ) = t·Σ|γ_i| − Σ|γ_i − γ̄| with γ̄ the mean over every ranked γ. The
  second part rewards distance from the mean, so the small γ go to 0 while the large ones are pushed
  up: a clear gap between pruned and kept channels. Its gradient is
  t·sign(γ_k) − sign(γ_k − γ̄) + mean_i sign(γ_i − γ̄); after the optimizer step γ is clamped to
  [0, bound] as in the reference code (which keeps R bounded below).

Both run on the device with no host sync. With fp16 and a GradScaler the gradients are unscaled
first, so λ is never divided by the loss scale (the caller's job: see `slimctl.train.TrainStep`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

REGULARIZERS = ("l1", "polarization")


def bn_scales(model: nn.Module, bn_names: list[str]) -> list[nn.Parameter]:
    """The γ parameters of the named BatchNorms (the ones the plan ranks)."""
    return [model.get_submodule(name).weight for name in bn_names]


def add_sparsity_grad(gammas: list[nn.Parameter], sparsity: float) -> None:
    """grad(γ) += λ·sign(γ) for every γ, in one fused op (γ only, never β)."""
    if sparsity == 0 or not gammas:
        return
    weights = [g.detach() for g in gammas]
    torch._foreach_add_([g.grad for g in gammas], torch._foreach_sign(weights), alpha=sparsity)


def polarization_grad(gammas: list[torch.Tensor], t: float) -> list[torch.Tensor]:
    """∂R/∂γ for R(γ) = t·Σ|γ_i| − Σ|γ_i − γ̄| over all of `gammas` at once (γ̄: their mean), split
    back per tensor. The mean stays on the device: no host sync."""
    flat = torch.cat([g.detach().flatten() for g in gammas])
    side = torch.sign(flat - flat.mean())
    grad = t * torch.sign(flat) - side + side.mean()
    return list(grad.split([g.numel() for g in gammas]))


@dataclass(frozen=True)
class SparsityTerm:
    """λ and which regularizer it weighs (`REGULARIZERS`); t and bound are polarization's."""

    sparsity: float  # λ
    regularizer: str = "l1"
    t: float = 1.0
    bound: float = 1.0

    def add_grad(self, gammas: list[nn.Parameter]) -> None:
        """grad(γ) += λ·∂R/∂γ, in fused ops (γ only, never β)."""
        if self.sparsity == 0 or not gammas:
            return
        if self.regularizer == "l1":
            add_sparsity_grad(gammas, self.sparsity)
            return
        torch._foreach_add_([g.grad for g in gammas], polarization_grad(gammas, self.t), alpha=self.sparsity)

    @torch.no_grad()
    def after_step(self, gammas: list[nn.Parameter]) -> None:
        """Polarization keeps γ in [0, bound] (after every optimizer step); L1 leaves γ as it is."""
        if self.sparsity == 0 or self.regularizer == "l1" or not gammas:
            return
        torch._foreach_clamp_min_(gammas, 0.0)
        torch._foreach_clamp_max_(gammas, self.bound)


def gamma_stats(gammas: list[nn.Parameter]) -> dict[str, float]:
    flat = torch.cat([g.detach().abs().float().flatten() for g in gammas])
    return {"gamma_mean_abs": float(flat.mean()), "gamma_frac_below_1e-2": float((flat < 1e-2).float().mean()),
            "gamma_frac_below_1e-3": float((flat < 1e-3).float().mean())}


# --------------------------------------------------------------------------- the L1 budget
#
# Over a run, plain SGD lets the L1 term move a γ by at most λ·Σ_t lr_t (the sum over every step;
# momentum can stretch that by up to 1/(1 − momentum), and the loss gradient pushes back). That
# product — the *L1 budget*, in units of γ — is what decides whether γ can reach ~0, not λ alone:
# the paper's VGG recipe (λ 1e-4, 160 epochs × 782 steps, lr 0.1/0.01/0.001) has ≈ 0.66, more than
# γ's initial 0.5; the same λ over a 30-epoch schedule has a fifth of that.


def l1_budget(sparsity: float, schedule_lr_sum: float) -> float:
    """How far (in units of |γ|) the L1 term alone can move a γ over the run: λ·Σ lr."""
    return sparsity * schedule_lr_sum


def sparsity_for_budget(budget: float, schedule_lr_sum: float) -> float:
    """The λ whose budget over this schedule is `budget`."""
    return budget / schedule_lr_sum


def budget_warning(budget: float, mean_abs_gamma: float) -> str | None:
    """A warning when the budget cannot bring a typical γ near zero (then pruning cuts channels
    that still carry signal, and accuracy right after pruning collapses)."""
    if budget <= 0 or budget >= mean_abs_gamma:
        return None
    return (
        f"the L1 budget of this schedule is {budget:.3g} (λ·Σlr), below the mean |γ| at start ({mean_abs_gamma:.3g}): "
        "γ will not polarize, so pruning will cut channels that still carry signal. Raise train.sparsity, or set "
        "train.sparsity_budget instead of λ (the paper's VGG recipe has about 0.66)"
    )
