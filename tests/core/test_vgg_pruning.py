import pytest
import torch
from torch import nn

from conftest import masked_reference, randomize_bn
from slimctl import prune_model
from slimctl.errors import SlimctlError
from slimctl.core.flops import count_flops, count_params
from slimctl.models import create_model, list_models, module_widths
from slimctl.core.plan import global_threshold, make_plan
from slimctl.trace import channel_groups


@pytest.mark.parametrize("arch", list_models())
def test_every_registered_model_runs_forward(arch):
    model = create_model(arch, 10, width=0.25).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vgg19_matches_the_paper_exactly():
    model = create_model("vgg19", 10)
    assert count_params(model) == 20_035_018
    assert count_flops(model) == 797_304_842


def test_vgg_init_is_the_papers():
    model = create_model("vgg11", 10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(b.weight == 0.5) and torch.all(b.bias == 0) for b in bns)
    conv = model.features.conv1  # 3×3, 128 out: std sqrt(2/(9·128))
    assert conv.weight.std().item() == pytest.approx((2 / (9 * 128)) ** 0.5, rel=0.05)
    assert torch.all(model.classifier.bias == 0)


def test_width_multiplier_scales_every_layer_and_keeps_at_least_one():
    model = create_model("vgg11", 10, width=0.25)
    assert model.features.conv0.out_channels == 16 and model.classifier.in_features == 128
    tiny = create_model("vgg11", 10, width=0.001)
    assert all(m.out_channels >= 1 for m in tiny.modules() if isinstance(m, nn.Conv2d))


def test_groups_cover_every_bn_once():
    model = create_model("vgg19", 10)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(g.bn for g in channel_groups(model)) == sorted(bns)


def test_threshold_is_the_papers_index_rule():
    scores = torch.tensor([0.5, 0.1, 0.4, 0.2, 0.3, 0.9, 0.8, 0.7, 0.6, 0.05])
    # sorted: .05 .1 .2 .3 .4 .5 .6 .7 .8 .9 → index int(10·0.35) = 3 → 0.3
    assert global_threshold(scores, 0.35) == pytest.approx(0.3)
    assert global_threshold(scores, 0.0) is None


def _set_gammas(model, values_per_bn):
    for g, values in zip(channel_groups(model), values_per_bn):
        bn = model.get_submodule(g.bn)
        bn.weight.data = torch.tensor(values, dtype=torch.float32)


def test_plan_keeps_strictly_above_threshold_and_at_least_min_channels():
    model = create_model("vgg11", 10, width=0.0625)  # widths 4, 8, 16, 16, 32, 32, 32, 32
    groups = channel_groups(model)
    widths = [model.get_submodule(g.bn).num_features for g in groups]
    # First layer: all tiny γ, so the global threshold empties it; min_channels keeps its best.
    values = [[1e-4 * (i + 1) for i in range(widths[0])]] + [[1.0 + 0.01 * i for i in range(w)] for w in widths[1:]]
    _set_gammas(model, values)
    plan = make_plan(model, groups, 0.1)
    first = plan.groups[0]
    assert first.kept == 1 and first.keep.tolist() == [widths[0] - 1]  # the largest |γ| survives
    for gp in plan.groups:
        scores = model.get_submodule(gp.group.bn).weight.abs()
        above = (scores > plan.threshold).nonzero().flatten()
        if len(above) >= 1:
            assert gp.keep.tolist() == above.tolist()
    plan3 = make_plan(model, groups, 0.1, min_channels=3)
    assert plan3.groups[0].kept == 3


def test_ratio_zero_keeps_everything_and_extreme_ratios_never_empty_a_layer():
    model = randomize_bn(create_model("vgg11", 10, width=0.125))
    total = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    pruned, plan, *_ = prune_model(model, 0.0)
    assert plan.kept == total and count_params(pruned) == count_params(model)
    for ratio in (0.5, 0.9, 0.99, 0.999999):
        pruned, plan, *_ = prune_model(model, ratio)
        assert all(gp.kept >= 1 for gp in plan.groups)
        assert pruned.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_range_is_refused(ratio):
    with pytest.raises(SlimctlError, match=r"\[0, 1\)"):
        prune_model(create_model("vgg11", 10, width=0.125), ratio)


@pytest.mark.parametrize("ratio", [0.3, 0.7, 0.95])
def test_pruned_equals_masked_original(ratio):
    torch.manual_seed(0)
    model = randomize_bn(create_model("vgg13", 10, width=0.25)).eval()
    pruned, plan, *_ = prune_model(model, ratio, compensate="none")  # literal removal
    pruned.eval()
    ref = masked_reference(model, plan)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(pruned(x), ref(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(model(x), ref(x), rtol=1e-4, atol=1e-5)  # pruning changed something
    assert count_params(pruned) < count_params(model)


def test_zeroing_only_the_bn_scale_would_not_match():
    # Sensitivity: the equivalence needs β zeroed too (surgery drops β of removed channels).
    model = randomize_bn(create_model("vgg11", 10, width=0.25)).eval()
    pruned, plan, *_ = prune_model(model, 0.5, compensate="none")
    ref = masked_reference(model, plan, zero_beta=False)  # only γ zeroed, β kept
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(pruned.eval()(x), ref(x), rtol=1e-4, atol=1e-5)
        assert torch.allclose(pruned(x), masked_reference(model, plan)(x), rtol=1e-4, atol=1e-5)


def test_round_to_keeps_multiples_and_never_exceeds_the_layer():
    model = randomize_bn(create_model("vgg11", 10, width=0.25))
    _, plan, *_ = prune_model(model, 0.6, round_to=8)
    for gp in plan.groups:
        assert gp.kept % 8 == 0 or gp.kept == gp.total
        assert gp.kept <= gp.total
        # the kept channels are the top-|γ| ones
        scores = model.get_submodule(gp.group.bn).weight.abs()
        dropped = torch.ones(gp.total, dtype=torch.bool)
        dropped[gp.keep] = False
        if dropped.any():
            assert scores[gp.keep].min() >= scores[dropped].max()


def test_second_pass_prunes_the_pruned_model():
    model = randomize_bn(create_model("vgg11", 10, width=0.25)).eval()
    once, plan1, *_ = prune_model(model, 0.5, compensate="none")
    twice, plan2, *_ = prune_model(once, 0.5, compensate="none")
    assert plan2.total == plan1.kept and plan2.kept < plan1.kept
    ref = masked_reference(once, plan2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(twice.eval()(x), ref(x), rtol=1e-4, atol=1e-5)


def test_rebuild_from_widths_reproduces_the_pruned_model():
    model = randomize_bn(create_model("vgg16", 10, width=0.25)).eval()
    pruned, _, *_ = prune_model(model, 0.6)
    rebuilt = create_model("vgg16", 10, width=0.25, widths=module_widths(pruned))
    rebuilt.load_state_dict(pruned.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), pruned.eval()(x))


def test_the_original_model_is_untouched():
    model = randomize_bn(create_model("vgg11", 10, width=0.25))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_model(model, 0.7)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("arch, args", [("vgg11", {}), ("preresnet", {"depth": 11}), ("densenet", {"depth": 10})])
def test_surgery_keeps_the_models_dtype(arch, args):
    model = randomize_bn(create_model(arch, 10, width=0.25, **args)).double().eval()
    pruned, _, *_ = prune_model(model, 0.5)
    assert {p.dtype for p in pruned.parameters()} == {torch.float64}
    assert pruned.eval()(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("width", [0.25, 0.5])
def test_vgg_param_count_at_width(width):
    # Independent of the builder: 3×3 convs without bias + BN (γ, β) + Linear(last, 10).
    widths = [max(1, round(c * width)) for c in (64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512,
                                                   512, 512, 512, 512)]
    expected, c_in = 0, 3
    for c in widths:
        expected += 9 * c_in * c + 2 * c
        c_in = c
    expected += c_in * 10 + 10
    assert count_params(create_model("vgg19", 10, width=width)) == expected
