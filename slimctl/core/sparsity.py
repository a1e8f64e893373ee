"""The paper's sparsity term: an L1 penalty λ·Σ|γ| on BatchNorm scales, applied as a subgradient.

After `backward()` and before `step()`: grad(γ) += λ·sign(γ), one fused foreach op over every ranked
BN (γ only, never β). With fp16 and a GradScaler the gradients are unscaled first, so λ is never
divided by the loss scale (the caller's job: see `slimctl.train.train_one_epoch`).
"""

from __future__ import annotations

import torch
from torch import nn


def bn_scales(model: nn.Module, bn_names: list[str]) -> list[nn.Parameter]:
    """The γ parameters of the named BatchNorms (the ones the plan ranks)."""
    return [model.get_submodule(name).weight for name in bn_names]


def add_sparsity_grad(gammas: list[nn.Parameter], sparsity: float) -> None:
    """grad(γ) += λ·sign(γ) for every γ, in one fused op (γ only, never β)."""
    if sparsity == 0 or not gammas:
        return
    weights = [g.detach() for g in gammas]
    torch._foreach_add_([g.grad for g in gammas], torch._foreach_sign(weights), alpha=sparsity)


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
