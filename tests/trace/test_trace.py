"""Channel groups derived from a torch.fx trace (slimctl.trace; docs/design.md, "Traced groups").

The property pinned for every model: in eval mode the pruned model (literal removal,
`compensate="none"`) computes what the original computes with γ and β zeroed at every removed
channel of every ranked BN of its group (selection groups: the ranking BN only, through the
selection's indices), while that reference differs from the original. Inputs are tiny (64×64,
batch 2) and torch runs on one thread: these tests share 2 cores.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import nn

from conftest import masked_reference, randomize_bn, rel_err
from slimctl.errors import SlimctlError
from slimctl.models import create_model
from slimctl.models.layers import module_widths
from slimctl.base.groups import ChannelGroup, Consumer
from slimctl.core.plan import make_plan
from slimctl.core.surgery import apply_plan
from slimctl.trace import TraceResult, channel_groups, derive_groups

torchvision = pytest.importorskip("torchvision")


pytestmark = pytest.mark.usefixtures("one_thread")


def image(size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(x)
    return out


def key(groups: list[ChannelGroup]) -> set:
    return {(g.bn, frozenset(g.producers), frozenset(g.consumers), g.selection, g.extra_bns) for g in groups}


def torchvision_model(name: str) -> nn.Module:
    kwargs = {"aux_logits": True, "init_weights": True} if name == "googlenet" else {}
    torch.manual_seed(0)  # the same weights whichever tests ran before in this process
    return getattr(torchvision.models, name)(weights=None, num_classes=10, **kwargs)


def prune_traced(model: nn.Module, x: torch.Tensor, ratio: float = 0.5, coupled: str = "keep"):
    result = derive_groups(model, x, coupled=coupled)
    result.prepare(model)
    randomize_bn(model)
    model.eval()
    plan = make_plan(model, result.groups, ratio)
    return result, plan, apply_plan(model, plan, compensate="none")  # literal removal


# --- slimctl's own families: the derived groups are the hand-declared ones ------------------------


@pytest.mark.parametrize(
    ("arch", "args"), [("vgg11", {}), ("preresnet", {"depth": 11}), ("densenet", {"depth": 10})]
)
def test_derived_groups_equal_the_hand_declared(arch: str, args: dict) -> None:
    model = create_model(arch, 10, width=0.25, **args)
    result = derive_groups(model, image(32))
    assert key(result.groups) == key(channel_groups(model))
    assert result.selections == ()  # their ChannelSelection modules already exist


def test_tracing_leaves_the_model_alone() -> None:
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    before = copy.deepcopy(model.state_dict())
    derive_groups(model, image())
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats too


# --- torchvision models: pruned == masked reference ----------------------------------------------

# model → kinds of space expected at least this many times (pins what each model exercises)
TORCHVISION = {
    "resnet18": {"free": 8, "coupled": 4},
    "mobilenet_v2": {"depthwise": 17, "coupled": 5},
    "mobilenet_v3_small": {"depthwise": 11},  # with squeeze-excitation
    "vgg16_bn": {"free": 13},  # flatten → Linear with 49 columns per channel
    "densenet121": {"selection": 62, "free": 58},
    "resnet50": {"free": 33},
    "efficientnet_b0": {"depthwise": 16},
    "googlenet": {"free": 59},  # every BN, aux heads included
    "regnet_x_400mf": {"grouped": 44},
    "resnext50_32x4d": {"grouped": 32},
    "shufflenet_v2_x1_0": {"depthwise": 17, "selection": 2},
}


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_pruned_equals_masked_original(name: str) -> None:
    model, x = torchvision_model(name), image()
    result, plan, pruned = prune_traced(model, x)
    kinds = Counter(s.kind for s in result.spaces)
    for kind, count in TORCHVISION[name].items():
        assert kinds[kind] >= count, (kind, kinds)
    assert all(s.reason for s in result.spaces if s.kind == "frozen")
    assert plan.kept < plan.total
    ref = masked_reference(model, plan)
    out_pruned, out_ref, out_orig = outputs(pruned, x), outputs(ref, x), outputs(model, x)
    assert rel_err(out_pruned, out_ref) < 1e-5
    assert rel_err(out_ref, out_orig) > 1e-3  # otherwise the comparison above could not fail
    # Training the pruned model works (googlenet: its aux heads too).
    pruned.train()
    out = pruned(x)
    loss = sum(o.square().mean() for o in out) if isinstance(out, tuple) else out.square().mean()
    loss.backward()


def test_googlenet_aux_heads_are_pruned_too() -> None:
    result = derive_groups(torchvision_model("googlenet"), image())
    ranked = {b for g in result.groups for b in g.bns}
    assert {"aux1.conv.bn", "aux2.conv.bn"} <= ranked


def test_channel_shuffle_and_split_freeze_with_a_reason() -> None:
    result = derive_groups(torchvision_model("shufflenet_v2_x1_0"), image())
    reasons = " ".join(s.reason for s in result.spaces if s.kind == "frozen")
    assert "chunk" in reasons and ("view" in reasons or "transpose" in reasons)


def test_pruned_torchvision_model_rebuilds_and_prunes_again() -> None:
    """Inserted selections are recorded by BN name; widths + state_dict rebuild the pruned model."""
    model, x = torchvision_model("densenet121"), image()
    result, _, pruned = prune_traced(model, x)
    widths = module_widths(pruned)
    assert result.selections and {n for n in widths if n.endswith(".select")} == {
        f"{bn}.select" for bn in result.selections}
    # The checkpoint path: arch + recorded widths (selections included) + state_dict.
    fresh = create_model("torchvision.densenet121", 10, widths=widths)
    fresh.load_state_dict(pruned.state_dict())
    assert torch.equal(outputs(fresh, x), outputs(pruned, x))
    # Second pass: traced again (the selections already exist), pruned again, still exact.
    again = derive_groups(pruned, x)
    assert again.selections == ()
    plan = make_plan(pruned, again.groups, 0.3)
    twice = apply_plan(pruned, plan, compensate="none")
    assert rel_err(outputs(twice, x), outputs(masked_reference(pruned, plan), x)) < 1e-5


def test_sync_batchnorm_conversion_keeps_the_selections() -> None:
    """train.sync_bn swaps every BN for a SyncBatchNorm, which keeps children but drops hooks."""
    from slimctl.base.inserted import reattach_selections

    x = image(32)
    _, _, pruned = prune_traced(torchvision_model("densenet121"), x)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(pruned))
    with pytest.raises(RuntimeError, match="channels|shape|size"):  # the consumers get the BN's full width
        outputs(synced, x)
    assert torch.equal(outputs(reattach_selections(synced), x), outputs(pruned, x))


# --- concatenations pruned at their producers -----------------------------------------------------


@pytest.mark.parametrize("coupled", ["max", "mean"])
def test_a_coupled_mode_prunes_a_concatenation_at_its_producers(coupled: str) -> None:
    """DenseNet under --coupled: each concatenated space (a layer's new channels, the stem's, a
    transition's) is removed at its producer and from every BN that reads it inside a concatenation,
    ranked by those BNs' slices together: no gather left, every BN narrower."""
    model, x = torchvision_model("densenet121"), image()
    result, plan, pruned = prune_traced(model, x, coupled=coupled)
    sliced = [gp for gp in plan.groups if gp.group.slices]
    assert len(sliced) == 62 and all(gp.group.reduce == coupled for gp in sliced)  # stem, 58 layers, 3 transitions
    assert result.selections == () and not any(gp.group.selection for gp in plan.groups)
    norm5 = pruned.features.norm5
    assert norm5.num_features < 1024 and pruned.classifier.in_features == norm5.num_features
    reference = masked_reference(model, plan)
    assert rel_err(outputs(pruned, x), outputs(reference, x)) < 1e-5
    assert rel_err(outputs(reference, x), outputs(model, x)) > 1e-3
    # Sensitivity: zeroing a removed channel in its first reader only is not the same function.
    only = {gp.group.bn: gp.group.slices[0][0] for gp in sliced if gp.kept < gp.total and len(gp.group.slices) > 1}
    assert only and rel_err(outputs(pruned, x), outputs(masked_reference(model, plan, only=only), x)) > 1e-3
    # The checkpoint path rebuilds it from its widths.
    fresh = create_model("torchvision.densenet121", 10, widths=module_widths(pruned))
    fresh.load_state_dict(pruned.state_dict())
    assert torch.equal(outputs(fresh, x), outputs(pruned, x))


def test_sparse_training_under_a_coupled_mode_regularizes_the_bns_that_rank_by_slices() -> None:
    from slimctl import Slimming

    model = torchvision_model("densenet121")
    slim = Slimming(model, (3, 64, 64), sparsity=1e-4, coupled="max")
    regularized = {id(g) for g in slim.gammas}
    assert id(model.features.norm5.weight) in regularized and len(regularized) == len(slim.gammas) == 121


# --- residual-coupled sets -----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "coupled"), [("resnet18", "max"), ("mobilenet_v2", "mean"), ("resnet50", "sum")])
def test_coupled_sets_prune_together(name: str, coupled: str) -> None:
    model, x = torchvision_model(name), image()
    result, plan, pruned = prune_traced(model, x, coupled=coupled)
    assert not [s for s in result.spaces if s.kind == "coupled" and not s.pruned]
    coupled_groups = [gp for gp in plan.groups if gp.group.coupled]
    assert coupled_groups and all(g.group.reduce == coupled and g.group.extra_bns for g in coupled_groups)
    assert rel_err(outputs(pruned, x), outputs(masked_reference(model, plan), x)) < 1e-5
    # Sensitivity: zeroing only one member of each pruned coupled set is not the same function.
    only = {gp.group.bn: gp.group.bn for gp in coupled_groups if gp.kept < gp.total}
    assert only
    assert rel_err(outputs(pruned, x), outputs(masked_reference(model, plan, only=only), x)) > 1e-3


def test_coupled_keep_is_the_default_and_keeps_the_stream() -> None:
    result = derive_groups(torchvision_model("resnet18"), image())
    kept = [s for s in result.spaces if s.kind == "coupled"]
    assert len(kept) == 4 and not any(s.pruned for s in kept)
    ranked = {b for g in result.groups for b in g.bns}
    assert not any(b in ranked for s in kept for b in s.bns)
    with pytest.raises(SlimctlError, match="coupled"):
        derive_groups(torchvision_model("resnet18"), image(), coupled="median")


# --- small graphs --------------------------------------------------------------------------------


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(12)
        self.conv3, self.bn3 = nn.Conv2d(12, 6, 1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(x, 1))


def test_grouped_conv_keeps_equal_counts_per_group_and_flatten_maps_columns() -> None:
    model, x = Grouped(), image(4)
    result, plan, pruned = prune_traced(model, x)
    by_bn = {gp.group.bn: gp for gp in plan.groups}
    assert by_bn["bn1"].group.divisions == by_bn["bn2"].group.divisions == 4
    assert by_bn["bn3"].group.consumers == (Consumer("fc", 0, 16),)
    for name, per in (("bn1", 2), ("bn2", 3)):
        counts = torch.bincount(by_bn[name].keep // per, minlength=4)
        assert bool((counts == counts[0]).all())
    assert pruned.conv2.groups == 4 and pruned.conv2.in_channels % 4 == 0
    assert rel_err(outputs(pruned, x), outputs(masked_reference(model, plan), x)) < 1e-5


class Gated(nn.Module):
    """A Sigmoid between a BN and the next conv: a zeroed channel is not zero there."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8)
        self.norm = nn.GroupNorm(2, 8)
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.sigmoid(self.bn1(self.conv1(x))))
        return self.conv3(self.norm(self.bn2(x)))


def test_sigmoid_and_groupnorm_freeze_the_spaces_they_touch() -> None:
    with pytest.raises(SlimctlError, match="no prunable channel group"):
        derive_groups(Gated(), image(8))


def test_frozen_spaces_name_their_reason() -> None:
    class Mixed(Gated):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv2(torch.relu(self.bn1(self.conv1(x))))
            return self.conv3(self.norm(self.bn2(x)))

    result = derive_groups(Mixed(), image(8))
    assert [g.bn for g in result.groups] == ["bn1"]
    frozen = {s.bns: s.reason for s in result.spaces if s.kind == "frozen"}
    assert "GroupNorm 'norm'" in frozen[("bn2",)]


# --- refusals ------------------------------------------------------------------------------------


def test_model_without_batchnorm_is_refused() -> None:
    with pytest.raises(SlimctlError, match="no BatchNorm2d"):
        derive_groups(torchvision.models.squeezenet1_0(weights=None, num_classes=10), image())


def test_layernorm_model_is_refused_naming_the_norm() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LayerNorm([8, 6, 6]), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with pytest.raises(SlimctlError, match="LayerNorm '1'"):
        derive_groups(model, image(8))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(torch.relu(self.bn(self.conv(x))))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:  # control flow on a tensor value: fx cannot trace it
            return x
        return -x


def test_data_dependent_control_flow_is_refused_naming_the_module() -> None:
    with pytest.raises(SlimctlError, match=r"'gate'.*leaf.*by hand"):
        derive_groups(Branchy(), image(8))


def test_trace_result_is_plain_data() -> None:
    result = derive_groups(create_model("vgg11", 10, width=0.25), image(32))
    assert isinstance(result, TraceResult)
    assert {s.kind for s in result.spaces} == {"free", "frozen"}
    assert all(s.members and s.width > 0 for s in result.spaces)


class Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.conv0(x)))
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn2(self.conv2(x)))  # one module with parameters, called twice
        y = self.bn3(self.conv3(x))
        z = y.relu_()  # in place on a value that the add below also reads
        return self.head(z + y)


def test_reused_parameterised_modules_and_shared_inplace_ops_freeze() -> None:
    result = derive_groups(Reused(), image(8))
    assert [g.bn for g in result.groups] == ["bn0"]
    assert "called 2 times" in result.frozen_bns["bn1"]  # its consumer conv2 is reused
    assert "called 2 times" in result.frozen_bns["bn2"]
    assert "in-place" in result.frozen_bns["bn3"]


def test_a_selection_that_keeps_every_channel_is_no_gather() -> None:
    """Tracing inserts a full-width selection on every selection BN; until a prune narrows it, the
    model must run as before (no full-width copy), or prune's unpruned reference times slower."""
    from slimctl.base.inserted import ChannelSelection

    selection, x = ChannelSelection(4), torch.randn(2, 4, 3, 3)
    assert selection(x) is x
    selection.indices = selection.indices[torch.tensor([0, 2])]
    assert torch.equal(selection(x), x[:, [0, 2]])
