"""slimctl.Slimming: network slimming inside the user's own loop (regularize each step, then prune)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import slimctl
from conftest import masked_reference, randomize_bn, rel_err, strongly_sparse


def tiny():
    torch.manual_seed(0)
    return randomize_bn(slimctl.create_model("vgg11", 10, width=0.125))


def step(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


def test_regularize_adds_lambda_sign_gamma_and_counts_the_budget():
    model, x, y = tiny(), torch.randn(4, 3, 32, 32), torch.arange(4)
    slim = slimctl.Slimming(model, x, sparsity=1e-2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    step(model, x, y)
    before = [g.grad.clone() for g in slim.gammas]
    slim.regularize(optimizer)
    for gamma, grad in zip(slim.gammas, before):
        assert torch.allclose(gamma.grad, grad + 1e-2 * gamma.detach().sign())
    slim.regularize(optimizer)
    assert slim.strength()["l1_budget_applied"] == pytest.approx(2 * 1e-2 * 0.05)
    budgeted = slimctl.Slimming(tiny(), x, budget=0.66, lr_sum=6.6)
    assert budgeted.sparsity == pytest.approx(0.1) and budgeted.strength()["l1_budget_planned"] == pytest.approx(0.66)


def test_polarization_in_your_own_loop_is_the_cli_trainers_step():
    from slimctl.core.sparsity import SparsityTerm
    from slimctl.train import TrainStep, train_one_epoch

    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    mine = tiny()
    slim = slimctl.Slimming(mine, x, sparsity=1e-2, regularizer="polarization", polarization_t=1.3, gamma_bound=0.8)
    optimizer = torch.optim.SGD(mine.parameters(), lr=0.5, momentum=0.9)
    theirs = copy.deepcopy(mine)
    gammas = slimctl.bn_scales(theirs, [g.bn for g in slim.groups])
    trainer = TrainStep(theirs, torch.optim.SGD(theirs.parameters(), lr=0.5, momentum=0.9), gammas=gammas,
                        sparsity=SparsityTerm(1e-2, "polarization", 1.3, 0.8), device=torch.device("cpu"), dtype=None)
    for _ in range(2):
        mine.train()
        step(mine, x, y)
        slim.regularize(optimizer)
        optimizer.step()
        slim.clamp()
        train_one_epoch(trainer, [(x, y)])
    for a, b in zip(mine.parameters(), theirs.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    flat = torch.cat([g.detach() for g in slim.gammas])
    assert float(flat.min()) >= 0 and float(flat.max()) == float(torch.tensor(0.8))  # clamped, in float32


def test_with_a_grad_scaler_the_term_is_added_to_the_unscaled_gradients():
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    plain, scaled = tiny(), tiny()
    reference = slimctl.Slimming(plain, x, sparsity=1e-2)
    step(plain, x, y)
    reference.regularize(torch.optim.SGD(plain.parameters(), lr=0.1))
    slim = slimctl.Slimming(scaled, x, sparsity=1e-2)
    optimizer = torch.optim.SGD(scaled.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled.zero_grad()
    scaler.scale(F.cross_entropy(scaled(x), y)).backward()
    slim.regularize(optimizer, scaler=scaler)
    for a, b in zip(slim.gammas, reference.gammas):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)
    scaler.step(optimizer)  # already unscaled: the scaler does not unscale twice
    scaler.update()


def test_prune_is_exact_leaves_the_model_alone_and_meets_a_flops_target():
    model = strongly_sparse(tiny())
    model.train()
    slim = slimctl.Slimming(model, (3, 32, 32))
    before = copy.deepcopy(model.state_dict())
    pruned = slim.prune(ratio=0.5)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(pruned.model(x), masked_reference(model, pruned.plan, zero_beta=False)(x)) < 1e-5
    assert pruned.exactness.exact and pruned.plan.kept < pruned.plan.total
    target = slim.prune(target_flops=0.3)
    assert slimctl.count_flops(target.model) <= 0.7 * slimctl.count_flops(model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8)),
                                         batch_size=4)
    recalibrated = slim.prune(ratio=0.5, recalibrate=loader)
    bn = "features.bn0"
    assert not torch.equal(recalibrated.model.get_submodule(bn).running_mean,
                           pruned.model.get_submodule(bn).running_mean)


def test_slimming_under_ddp_unwraps_and_matches_the_plain_model(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
        plain, wrapped = tiny(), tiny()
        reference = slimctl.Slimming(plain, x, sparsity=1e-2)
        slim = slimctl.Slimming(wrapped, x, sparsity=1e-2)  # before wrapping, as documented
        ddp = torch.nn.parallel.DistributedDataParallel(wrapped)
        step(plain, x, y)
        step(ddp, x, y)
        reference.regularize(torch.optim.SGD(plain.parameters(), lr=0.1))
        slim.regularize(torch.optim.SGD(ddp.parameters(), lr=0.1))
        for a, b in zip(slim.gammas, reference.gammas):
            assert torch.allclose(a.grad, b.grad, atol=1e-6)
        assert slimctl.Slimming(ddp, x).model is wrapped
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kwargs, message", [
    ({"example_input": (3, 32)}, "expected a batch"),
    ({"sparsity": -1.0}, "sparsity must be >= 0"),
    ({"budget": 0.66}, "budget needs lr_sum"),
    ({"budget": 0.66, "lr_sum": 1.0, "sparsity": 1e-4}, "and no sparsity"),
    ({"regularizer": "l2"}, "regularizer must be one of l1, polarization"),
    ({"regularizer": "polarization", "polarization_t": float("nan")}, "finite polarization_t"),
    ({"regularizer": "polarization", "gamma_bound": 0.0}, "gamma_bound > 0"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    args = {"example_input": (3, 32, 32), **kwargs}
    with pytest.raises(slimctl.SlimctlError, match=message):
        slimctl.Slimming(tiny(), **args)
    with pytest.raises(slimctl.SlimctlError, match="one of ratio, target_flops"):
        slimctl.Slimming(tiny(), (3, 32, 32)).prune(ratio=0.5, target_flops=0.5)
