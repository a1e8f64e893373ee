import pytest
import torch
from torch import nn

from slimctl.models import create_model
from slimctl.trace import channel_groups
from slimctl.base.device import resolve_precision
from slimctl.core.sparsity import add_sparsity_grad, bn_scales, gamma_stats


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
    assert resolve_precision("fp16", cpu) is torch.float16


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_precision_is_bf16_only_where_it_is_native(monkeypatch, native, expected):
    monkeypatch.setattr("slimctl.base.device.cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", torch.device("cpu")) is expected
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda *args, **kwargs: native)
    assert resolve_precision("auto", torch.device("cuda")) is expected
    assert resolve_precision("fp32", torch.device("cuda")) is None  # an explicit choice is never overridden


def _one_step_gammas(precision, sparsity, scaler):
    from slimctl.train import TrainStep, train_one_epoch

    torch.manual_seed(0)
    model = create_model("vgg11", 10, width=0.125)
    gammas = bn_scales(model, [g.bn for g in channel_groups(model)])
    with torch.no_grad():
        for g in gammas:
            g.uniform_(-1, 1)
    signs = torch.cat([g.detach().sign() for g in gammas])
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    # Plain SGD: the update is exactly −lr·grad, so the λ term's share is visible.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train_one_epoch(TrainStep(model, opt, gammas=gammas, sparsity=sparsity, device=torch.device("cpu"),
                              dtype=precision, scaler=scaler), [(x, y)])
    return torch.cat([g.detach().clone() for g in gammas]), signs


@pytest.mark.parametrize("precision, use_scaler", [(None, False), (torch.bfloat16, False), (torch.float16, True)])
def test_the_sparsity_update_is_the_same_under_every_precision(precision, use_scaler):
    # λ·sign(γ) must reach γ as lr·λ·sign(γ) whatever the loss scale: with a GradScaler it is added
    # after unscaling (added before, it would be divided by the scale, 2^10 here).
    make_scaler = (lambda: torch.amp.GradScaler("cpu", init_scale=2.0**10)) if use_scaler else (lambda: None)
    with_l1, signs = _one_step_gammas(precision, 1e-2, make_scaler())
    without, _ = _one_step_gammas(precision, 0.0, make_scaler())
    assert torch.allclose(without - with_l1, 0.5 * 1e-2 * signs, atol=1e-6)
