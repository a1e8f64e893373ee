"""The paper's ResNet-164 and DenseNet-40: exact sizes, FLOPs, and pruning through channel selection.

The central property (docs/design.md, "Channel groups"): in eval mode a model pruned by literal
removal (`compensate="none"`) computes what the original computes with γ and β zeroed at every
removed channel. For a selection group the removed positions index
the BN's full width through the selection's indices (the BN itself never shrinks).
Smaller depths stand in for the full networks where the behaviour is the same, to stay fast.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import masked_reference, randomize_bn, removed_channels, zero_channels
from slimctl.io.checkpoint import model_from_checkpoint
from slimctl.errors import SlimctlError
from slimctl.core.flops import count_flops, count_params
from slimctl.models import ChannelSelection, create_model, module_widths
from slimctl.trace import channel_groups
from slimctl.core.surgery import prune_model

# Small members of each family: same block structure (first blocks with a strided shortcut, later
# ones with the identity; layers, transitions and the head through selections) at a fraction of the cost.
SMALL = {
    "preresnet": ("preresnet", {"depth": 29}),
    "densenet": ("densenet", {"depth": 22}),
}


def inputs(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def assert_same_function(pruned: nn.Module, ref: nn.Module, original: nn.Module) -> None:
    x = inputs()
    out_pruned, out_ref, out_orig = pruned.eval()(x), ref.eval()(x), original.eval()(x)
    assert torch.allclose(out_pruned, out_ref, rtol=1e-4, atol=1e-5), (out_pruned - out_ref).abs().max()
    # Otherwise the comparison above could not fail.
    assert not torch.allclose(out_ref, out_orig, rtol=1e-3, atol=1e-4)


def bn_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


# --- sizes ---------------------------------------------------------------------------------------

# (arch, params, FLOPs measured here, the paper's FLOPs or None). FLOPs are pinned exactly so any
# change shows; the paper's figure is matched within 1.5% (the head's 8×8 pool, the transitions'
# 2×2 pools and the ReLUs are counted; they add < 0.1%).
SIZES = [
    ("resnet164", 1_703_258, 504_759_306, 4.99e8),
    ("preresnet56", 590_426, 177_701_898, None),
    ("densenet40", 1_019_722, 536_665_354, 5.33e8),
]


@pytest.mark.parametrize(("arch", "params", "flops", "paper_flops"), SIZES)
def test_params_and_flops_match_the_paper(arch: str, params: int, flops: int, paper_flops: float | None) -> None:
    model = create_model(arch, 10)
    assert count_params(model) == params  # selection indices are buffers, not parameters
    measured = count_flops(model)
    assert measured == flops
    if paper_flops is not None:
        assert abs(measured - paper_flops) / paper_flops < 0.015


def test_family_builders_take_depth_and_growth() -> None:
    assert count_params(create_model("preresnet", 10)) == 1_703_258  # depth 164 by default
    assert count_params(create_model("preresnet", 10, depth=56)) == 590_426
    assert count_params(create_model("densenet", 10)) == 1_019_722  # depth 40, growth 12
    model = create_model("densenet", 100, depth=22, growth=8)
    assert len(model.dense1) == 6 and model.dense1[0].conv.out_channels == 8
    assert model.arch_spec["arch_args"] == {"width": 1.0, "depth": 22, "growth": 8}


@pytest.mark.parametrize(
    ("arch", "args"),
    [("preresnet", {"depth": 57}), ("preresnet", {"depth": 2}), ("densenet", {"depth": 41}),
     ("densenet", {"growth": 0}), ("resnet164", {"depth": 56}), ("vgg19", {"depth": 19})],
)
def test_bad_arch_args_are_user_errors(arch: str, args: dict) -> None:
    with pytest.raises(SlimctlError):
        create_model(arch, 10, **args)


@pytest.mark.parametrize(
    ("arch", "width"), [("resnet164", 1.0), ("preresnet56", 1.0), ("densenet40", 1.0), ("resnet164", 0.25),
                        ("densenet40", 0.25)],
)
@torch.no_grad()
def test_forward_shapes(arch: str, width: float) -> None:
    model = create_model(arch, 10, width=width).eval()
    for batch in (1, 2):
        assert model(torch.randn(batch, 3, 32, 32)).shape == (batch, 10)


@pytest.mark.parametrize(("arch", "args"), list(SMALL.values()))
@torch.no_grad()
def test_head_pools_to_one_pixel_at_any_input_size(arch: str, args: dict) -> None:
    model = create_model(arch, 10, **args).eval()
    assert model(torch.randn(1, 3, 64, 48)).shape == (1, 10)


def test_width_scales_every_stream() -> None:
    res = create_model("resnet164", 10, width=0.25)
    assert res.stem.out_channels == 4
    assert [res.layer1[0].conv1.out_channels, res.layer2[0].conv1.out_channels, res.layer3[0].conv1.out_channels] == [4, 8, 16]
    assert res.head.fc.in_features == 64
    dense = create_model("densenet40", 10, width=0.25)
    assert dense.stem.out_channels == 4 and dense.dense1[0].conv.out_channels == 3
    tiny = create_model("densenet40", 10, width=0.01)  # never zero channels
    assert tiny.stem.out_channels == 1 and tiny.dense1[0].conv.out_channels == 1


def test_training_step_leaves_selection_indices_alone() -> None:
    model, plan, *_ = prune_model(randomize_bn(create_model("preresnet", 10, depth=11)).eval(), 0.5)
    assert any(gp.group.selection and gp.kept < gp.total for gp in plan.groups)  # indices are a true subset
    selections = {n: m for n, m in model.named_modules() if isinstance(m, ChannelSelection)}
    before = {n: m.indices.clone() for n, m in selections.items()}
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
    loss.backward()
    opt.step()
    assert all(p.grad is not None for p in model.parameters())
    assert not any(list(m.parameters(recurse=False)) for m in selections.values())
    assert all(torch.equal(m.indices, before[n]) for n, m in selections.items())


# --- channel groups --------------------------------------------------------------------------------

@pytest.mark.parametrize(("arch", "args"), [("resnet164", {}), ("densenet40", {}), *SMALL.values()])
def test_groups_cover_every_batchnorm_exactly_once(arch: str, args: dict) -> None:
    model = create_model(arch, 10, **args)
    groups = channel_groups(model)
    ranked = [g.bn for g in groups]
    assert sorted(ranked) == sorted(bn_names(model))
    assert len(set(ranked)) == len(ranked)
    modules = dict(model.named_modules())
    for g in groups:
        bn = modules[g.bn]
        for c in g.consumers:
            assert c.module in modules and c.offset == 0 and c.repeat == 1
        if g.selection is not None:
            # Selection groups never resize the BN (it sits on a stream read whole elsewhere).
            assert isinstance(modules[g.selection], ChannelSelection) and g.producers == ()
            assert modules[g.selection].indices.numel() == bn.num_features
        else:
            assert g.bn in g.producers
        width = modules[g.selection].indices.numel() if g.selection else bn.num_features
        assert all(_in_width(modules[c.module]) == width for c in g.consumers)


def _in_width(module: nn.Module) -> int:
    return module.in_channels if isinstance(module, nn.Conv2d) else module.in_features


# --- pruning --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(SMALL))
@pytest.mark.parametrize("ratio", [0.4, 0.6, 0.9])
def test_pruned_equals_masked_original(family: str, ratio: float) -> None:
    arch, args = SMALL[family]
    model = randomize_bn(create_model(arch, 10, **args)).eval()
    pruned, plan, *_ = prune_model(model, ratio, compensate="none")  # literal removal
    assert plan.kept < plan.total
    assert all(g.kept >= 1 for g in plan.groups)
    assert count_params(pruned) < count_params(model)
    assert_same_function(pruned, masked_reference(model, plan), model)
    # The stream keeps its width: selection BNs and every conv writing the stream stay whole;
    # only the consumers read fewer channels.
    before, after = module_widths(model), module_widths(pruned)
    for gp in plan.groups:
        if gp.group.selection is not None:
            assert after[gp.group.bn] == before[gp.group.bn]
            assert after[gp.group.selection] == [gp.kept]
    stream = [n for n in before if n == "stem" or n.endswith(("conv3", "downsample")) or
              (family == "densenet" and n.endswith(".conv"))]
    assert stream and all(after[n][1] == before[n][1] for n in stream)
    assert pruned.head.fc.in_features == pruned.head.select.indices.numel() < model.head.fc.in_features


def test_resnet164_at_90_percent_keeps_every_block_alive() -> None:
    model = randomize_bn(create_model("resnet164", 10)).eval()
    # One whole bottleneck far below the threshold: min_channels must keep one channel of each space.
    block = model.layer2[3]
    with torch.no_grad():
        for bn in (block.bn1, block.bn2, block.bn3):
            bn.weight.mul_(1e-3)
    pruned, plan, *_ = prune_model(model, 0.9, compensate="none")
    kept = {g.group.bn: g.kept for g in plan.groups}
    assert kept["layer2.3.bn1"] == kept["layer2.3.bn2"] == kept["layer2.3.bn3"] == 1
    for m in pruned.modules():
        if isinstance(m, nn.Conv2d):
            assert m.in_channels >= 1 and m.out_channels >= 1
    assert pruned.layer2[3].conv2.weight.shape == (1, 1, 3, 3)
    assert count_flops(pruned) < count_flops(model) / 2
    assert_same_function(pruned, masked_reference(model, plan), model)


@pytest.mark.parametrize("family", sorted(SMALL))
def test_two_passes_equal_the_masked_original(family: str) -> None:
    arch, args = SMALL[family]
    model = randomize_bn(create_model(arch, 10, **args)).eval()
    once, plan1, *_ = prune_model(model, 0.5, compensate="none")
    twice, plan2, *_ = prune_model(once, 0.5, compensate="none")
    removed, removed2 = removed_channels(model, plan1), removed_channels(once, plan2)
    # Map pass-2 positions back to the original's channels: a free BN was sliced to plan1's keep;
    # a selection BN kept its width, and its selection indices already name original channels.
    for gp in plan1.groups:
        bn = gp.group.bn
        origin = gp.keep if gp.group.selection is None else torch.arange(model.get_submodule(bn).num_features)
        removed[bn] = torch.cat([removed[bn], origin[removed2[bn]]])
    assert plan2.kept < plan2.total
    assert_same_function(twice, zero_channels(model, removed), model)


@pytest.mark.parametrize("family", sorted(SMALL))
def test_pruned_model_rebuilds_from_widths(family: str) -> None:
    arch, args = SMALL[family]
    model = randomize_bn(create_model(arch, 10, **args)).eval()
    pruned, _, *_ = prune_model(model, 0.6)
    rebuilt = create_model(arch, 10, widths=module_widths(pruned), **args)
    rebuilt.load_state_dict(pruned.state_dict())  # strict: every shape, incl. selection indices, matches
    assert module_widths(rebuilt) == module_widths(pruned)
    x = inputs()
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), pruned.eval()(x))
    # The checkpoint path: arch_args (depth, growth, width) travel with the widths.
    spec = pruned.arch_spec
    ckpt = {"arch": spec["arch"], "num_classes": spec["num_classes"], "arch_args": spec["arch_args"],
            "widths": module_widths(pruned), "state_dict": pruned.state_dict()}
    with torch.no_grad():
        assert torch.equal(model_from_checkpoint(ckpt).eval()(x), pruned(x))
