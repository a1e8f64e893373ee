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
    return {"gamma_mean_abs": float(flat.mean()), "gamma_frac_below_1e-2": float((flat < 1e-2).float().mean())}
