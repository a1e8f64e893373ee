"""β-compensated removal (slimctl.core.compensate): the pruned model equals the original with only the
removed channels' γ zeroed (`exact`), a per-channel bias where that is exact (`bias`), or the
original with γ and β zeroed (`none`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import masked_reference, strongly_sparse
from slimctl import load_model, make_checkpoint, save_checkpoint
from slimctl.core.flops import count_flops
from slimctl.base.groups import ChannelGroup, Consumer
from slimctl.base.inserted import response_of
from slimctl.models import create_model
from slimctl.core.plan import make_plan
from slimctl.core.surgery import apply_plan, apply_plan_with_notes, applied_plan, prune_model

FAMILIES = [("vgg11", {"width": 0.25}), ("preresnet", {"depth": 11}), ("densenet", {"depth": 10, "growth": 4})]
TRACED = ["torchvision.resnet18", "torchvision.mobilenet_v2"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def outputs(model: nn.Module, size: int, seed: int = 3) -> torch.Tensor:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("arch, args", FAMILIES, ids=[a for a, _ in FAMILIES])
def test_exact_equals_gamma_zeroed_original_on_every_family(arch, args):
    model = strongly_sparse(create_model(arch, 10, **args))
    pruned, plan, *_ = prune_model(model, 0.5, compensate="exact")
    ref = masked_reference(model, plan, zero_beta=False)
    for size in (32, 40):  # the per-position terms follow the input size
        assert rel_err(outputs(pruned, size), outputs(ref, size)) < 1e-5
    # … and the literal removal does not: the removed channels' constants mattered
    literal, _, *_ = prune_model(model, 0.5, compensate="none")
    assert rel_err(outputs(literal, 32), outputs(ref, 32)) > 1e-3


@pytest.mark.parametrize("arch", TRACED)
def test_exact_on_traced_torchvision_models(arch, one_thread):
    model = strongly_sparse(create_model(arch, 10, input_size=(3, 64, 64)))
    pruned, plan, *_ = prune_model(model, 0.5, compensate="exact")
    ref = masked_reference(model, plan, zero_beta=False)
    for size in (64, 72):
        assert rel_err(outputs(pruned, size), outputs(ref, size)) < 1e-5


def test_none_equals_gamma_and_beta_zeroed():
    model = strongly_sparse(create_model("vgg11", 10, width=0.25))
    pruned, plan, *_ = prune_model(model, 0.5, compensate="none")
    assert rel_err(outputs(pruned, 32), outputs(masked_reference(model, plan), 32)) < 1e-5
    assert not any(response_of(m) is not None for m in pruned.modules())


def pointwise_net() -> nn.Module:
    """Every consumer is a 1×1 conv or a Linear: there a per-channel bias is exact."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def test_bias_is_exact_for_linear_and_pointwise_consumers_and_lossy_for_padded_ones():
    model = strongly_sparse(pointwise_net())
    pruned, plan, *_ = prune_model(model, 0.5, compensate="bias")
    ref = masked_reference(model, plan, zero_beta=False)
    assert rel_err(outputs(pruned, 16), outputs(ref, 16)) < 1e-5
    assert not any(response_of(m) is not None and response_of(m).kernel.numel() for m in pruned.modules())

    vgg = strongly_sparse(create_model("vgg11", 10, width=0.25))
    biased, plan, *_ = prune_model(vgg, 0.5, compensate="bias")
    ref = masked_reference(vgg, plan, zero_beta=False)
    literal, _, *_ = prune_model(vgg, 0.5, compensate="none")
    error = rel_err(outputs(biased, 32), outputs(ref, 32))
    assert 1e-5 < error < rel_err(outputs(literal, 32), outputs(ref, 32))  # lossy, but better than none


def test_a_linear_with_a_bias_absorbs_its_term():
    model = strongly_sparse(create_model("vgg11", 10, width=0.25))
    pruned, _, *_ = prune_model(model, 0.5)
    assert response_of(pruned.classifier) is None  # folded into classifier.bias: a plain Linear
    assert not torch.equal(pruned.classifier.bias, model.classifier.bias)
    assert response_of(pruned.features.conv1) is not None  # a padded 3×3 consumer: per position


def test_multipass_and_checkpoint_round_trip_keep_the_responses(tmp_path):
    model = strongly_sparse(create_model("preresnet", 10, depth=11))
    once, plan1, *_ = prune_model(model, 0.4)
    twice, plan2, *_ = prune_model(once, 0.3)
    ref = masked_reference(once, plan2, zero_beta=False)
    assert rel_err(outputs(twice, 32), outputs(ref, 32)) < 1e-5
    save_checkpoint(tmp_path / "p.pt", make_checkpoint(twice, stage="prune"))
    loaded = load_model(tmp_path / "p.pt")
    assert torch.equal(outputs(loaded, 36), outputs(twice, 36))
    assert count_flops(loaded) == count_flops(twice)


def test_compensation_adds_one_flop_per_output_element():
    model = strongly_sparse(create_model("vgg11", 10, width=0.25))
    _, plan, *_ = prune_model(model, 0.5)
    exact, none = apply_plan(model, plan, compensate="exact"), apply_plan(model, plan, compensate="none")
    responses = [m for m in exact.modules() if response_of(m) is not None]
    assert responses
    # the classifier's term is folded into its bias; every other term adds one FLOP per output element
    extra = count_flops(exact) - count_flops(none)
    assert 0 < extra < count_flops(none) * 0.05


class DeclaredNonConstant(nn.Module):
    """A family-style model whose declared consumer is marked as not reached by a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)  # zero padding, counted: borders are not constant
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.pool(torch.relu(self.bn1(self.conv1(x)))))).mean((2, 3))

    def channel_groups(self) -> list[ChannelGroup]:
        return [ChannelGroup("bn1", ("conv1", "bn1"), (Consumer("conv2", constant=False),))]


def test_a_consumer_not_reached_by_a_constant_keeps_its_channels_and_is_named():
    model = strongly_sparse(DeclaredNonConstant())
    model.arch_spec = {"input_size": [3, 16, 16]}
    plan = make_plan(model, model.channel_groups(), 0.5)
    assert plan.kept < plan.total
    pruned, notes, applied = applied_plan(model, plan, compensate="exact")
    assert applied.kept == applied.total and pruned.conv2.in_channels == 8  # kept whole: exact stays exact
    assert any("'conv2'" in n and "kept" in n for n in notes)
    # … while literal removal, which promises only the γβ-zeroed original, still prunes
    assert apply_plan(model, plan, compensate="none").conv2.in_channels < 8
    # and the safety net: declared constant although it is not → measured, refused, kept, named
    model.channel_groups = lambda: [ChannelGroup("bn1", ("conv1", "bn1"), (Consumer("conv2"),))]
    plan = make_plan(model, model.channel_groups(), 0.5)
    pruned, notes, applied = applied_plan(model, plan, compensate="exact")
    assert pruned.conv2.in_channels == 8 and any("not constant" in n for n in notes)
    assert rel_err(outputs(pruned, 16), outputs(model, 16)) < 1e-6


class TrainingOnlyHead(nn.Module):
    """A consumer that runs only in training mode, like GoogLeNet's auxiliary classifiers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.aux = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor):
        y = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(y)).mean((2, 3))
        return (out, self.aux(y).mean((2, 3))) if self.training else out

    def channel_groups(self) -> list[ChannelGroup]:
        return [ChannelGroup("bn1", ("conv1", "bn1"), (Consumer("conv2"), Consumer("aux")))]


def test_a_consumer_that_never_runs_in_eval_is_named_not_a_crash():
    model = strongly_sparse(TrainingOnlyHead())
    model.arch_spec = {"input_size": [3, 16, 16]}
    plan = make_plan(model, model.channel_groups(), 0.5)
    pruned, notes = apply_plan_with_notes(model, plan, compensate="exact")
    assert any("'aux'" in n and "eval mode" in n for n in notes)
    assert response_of(pruned.conv2) is not None  # the consumer that runs is still compensated
    ref = masked_reference(model, plan, zero_beta=False)
    assert rel_err(outputs(pruned, 16), outputs(ref, 16)) < 1e-5


def test_the_response_keeps_channels_last_and_matches_contiguous():
    model = strongly_sparse(create_model("vgg11", 10, width=0.25))
    pruned, _, *_ = prune_model(model, 0.5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    seen = []
    pruned.features.conv1.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        plain = pruned.eval()(x)
        fast = pruned.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert seen == [False, True]  # the in-place add kept each output's layout
    assert rel_err(fast, plain) < 1e-5


def test_a_float64_model_stays_exact_to_float64_precision():
    model = strongly_sparse(create_model("vgg11", 10, width=0.25)).double()
    pruned, plan, *_ = prune_model(model, 0.5)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        error = rel_err(pruned.eval()(x), masked_reference(model, plan, zero_beta=False)(x))
    assert error < 1e-12
    assert response_of(pruned.features.conv1).kernel.dtype == torch.float64
