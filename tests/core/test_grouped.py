"""Whole groups of grouped convolutions: dropped on both sides, exactly, with linked spaces kept alike."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import slimctl
from conftest import grouped_bottleneck
from slimctl.core.compensate import gamma_zeroed
from slimctl.core.grouped import linked_sets, whole_groups
from slimctl.core.surgery import applied_plan


def _plan(model: nn.Module, ratio: float = 0.5):
    groups = slimctl.channel_groups(copy.deepcopy(model).float())  # traced in float; the groups are names
    return slimctl.make_plan(model, groups, ratio)


def test_the_grouped_convs_two_spaces_are_linked_and_keep_the_same_whole_groups():
    model = grouped_bottleneck()
    plan = _plan(model)
    (link,) = linked_sets(model, plan)
    names = {plan.groups[i].group.bn for i in link}
    assert names == {"bn_a", "bn_b"}
    whole = whole_groups(model, plan)
    keeps = [whole.groups[i].keep for i in link]
    assert torch.equal(keeps[0], keeps[1])
    chunks = keeps[0].view(-1, 3)  # whole chunks of 3: consecutive channels of one group each
    assert bool((chunks[:, 0] % 3 == 0).all()) and bool((chunks.diff(dim=1) == 1).all())
    kept, total = sum(plan.groups[i].kept for i in link), sum(plan.groups[i].total for i in link)
    assert chunks.shape[0] == -(-4 * kept // total)  # ⌈G · kept / total⌉: never fewer channels than γ chose
    mean = (model.bn_a.weight.abs() + model.bn_b.weight.abs()).detach().view(4, 3).mean(1)
    assert set((chunks[:, 0] // 3).tolist()) == set(torch.topk(mean, chunks.shape[0]).indices.tolist())


def test_dropping_whole_groups_gives_fewer_groups_of_the_original_width_and_stays_exact():
    model = grouped_bottleneck()
    whole = whole_groups(model, _plan(model))
    pruned, notes, applied = applied_plan(model, whole)
    assert not notes
    k = whole.groups[linked_sets(model, whole)[0][0]].kept // 3
    assert 0 < k < 4 and (pruned.b.groups, pruned.b.in_channels, pruned.b.out_channels) == (k, 3 * k, 3 * k)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(pruned(x), gamma_zeroed(model, applied)(x), atol=1e-10)
    # Removed input groups feed only removed output groups: the grouped conv carries no term.
    assert not any(type(m).__name__ == "ConstantResponse" for m in pruned.b.modules())


def test_a_pruned_checkpoint_with_dropped_groups_reloads(tmp_path):
    model = grouped_bottleneck()
    pruned = slimctl.apply_plan(model, whole_groups(model, _plan(model)))
    slimctl.save_model(pruned, tmp_path / "p.pt", args={})  # rebuilt from conftest.Bottleneck
    again = slimctl.load_model(tmp_path / "p.pt").double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert again.b.groups == pruned.b.groups and torch.allclose(again(x), pruned(x))


def test_keeping_one_linked_space_whole_keeps_the_other_whole_too():
    model = grouped_bottleneck()
    whole = whole_groups(model, _plan(model))
    (link,) = whole.links
    kept = whole.keeping({link[0]})
    assert all(kept.groups[i].kept == kept.groups[i].total for i in link)
    slimctl.apply_plan(model, kept)  # a consistent conv: both sides whole


def test_min_channels_holds_in_every_linked_space():
    model = grouped_bottleneck()
    plan = _plan(model, 0.9)
    whole = whole_groups(model, plan, min_channels=7)
    assert all(whole.groups[i].kept >= 7 for link in whole.links for i in link)  # 3 groups of 3


def test_a_grouped_conv_whose_input_space_keeps_its_width_is_not_linked():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),  # no BN ranks the stem's space: kept
                          nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 1)).eval()
    model.arch_spec = {"arch": None, "num_classes": 4, "arch_args": {}, "input_size": [3, 8, 8]}
    plan = _plan(model)
    assert plan.groups[0].kept < 8  # the grouped conv's output space is cut, channels per group
    assert linked_sets(model, plan) == [] and whole_groups(model, plan).groups == plan.groups


def test_a_grouped_conv_must_keep_input_and_output_channels_in_the_same_groups():
    from slimctl.core.surgery import _sliced_grouped

    conv = nn.Conv2d(6, 6, 1, groups=3)
    state = {k: v.detach() for k, v in conv.state_dict().items()}
    with pytest.raises(TypeError, match="same groups"):
        _sliced_grouped(conv, dict(state), torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 4, 5]))
    with pytest.raises(TypeError, match="same number of input"):
        _sliced_grouped(conv, dict(state), torch.tensor([0, 2, 3]), torch.tensor([0, 1, 2]))
    new = _sliced_grouped(conv, dict(state), torch.tensor([2, 3]), torch.tensor([2, 3]))
    assert (new.groups, new.in_channels) == (1, 2) and torch.equal(new.weight, conv.weight[2:4])
