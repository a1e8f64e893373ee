import pytest
import torch
from torch import nn

from slimctl.models import create_model
from slimctl.plan import channel_groups
from slimctl.train import add_sparsity_grad, bn_scales, gamma_stats, resolve_precision


def _model_with_grads():
    torch.manual_seed(0)
    model = create_model("vgg11", 10, width=0.125)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(-1, 1)
    loss = model(torch.randn(4, 3, 32, 32)).square().mean()
    loss.backward()
    return model


def test_sparsity_adds_lambda_sign_gamma_to_gamma_grads_only():
    model = _model_with_grads()
    gammas = bn_scales(model, [g.bn for g in channel_groups(model)])
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    add_sparsity_grad(gammas, 1e-2)
    gamma_ids = {id(g) for g in gammas}
    for name, p in model.named_parameters():
        if id(p) in gamma_ids:
            assert torch.allclose(p.grad, before[name] + 1e-2 * torch.sign(p.detach()))
        else:  # β, conv and linear weights are untouched
            assert torch.equal(p.grad, before[name])


def test_zero_sparsity_is_a_no_op():
    model = _model_with_grads()
    gammas = bn_scales(model, [g.bn for g in channel_groups(model)])
    before = [g.grad.clone() for g in gammas]
    add_sparsity_grad(gammas, 0.0)
    assert all(torch.equal(a, g.grad) for a, g in zip(before, gammas))


def test_gamma_stats():
    g = [nn.Parameter(torch.tensor([0.001, -0.5, 0.005, 1.0]))]
    stats = gamma_stats(g)
    assert stats["gamma_mean_abs"] == pytest.approx((0.001 + 0.5 + 0.005 + 1.0) / 4)
    assert stats["gamma_frac_below_1e-2"] == pytest.approx(0.5)


def test_precision_choices():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cpu) in (None, torch.bfloat16)
