"""The tracer's op table (slimctl.trace.rules): one table for the walk and for selection detection,
and the constant flag that β-compensated pruning reads (`Consumer.constant`).

Tiny models on tiny inputs, CPU, one thread: these tests share 2 cores with other work.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import randomize_bn
from slimctl.base.groups import ChannelGroup, Consumer
from slimctl.base.operators import profile_map
from slimctl.trace import derive_groups, space_rows
from slimctl.trace.rules import Op, call_counts, classify
from slimctl.trace.graph import trace_graph


@pytest.fixture(autouse=True)
def _one_thread_seeded():
    """One thread, and every model initialised the same way each run (the global RNG is restored)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield
    torch.set_num_threads(threads)


def image(size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """`randomize_bn`, with β shifted to be clearly nonzero; eval mode."""
    randomize_bn(model, seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias += 0.2
    return model.eval()


def group_of(groups: list[ChannelGroup], bn: str) -> ChannelGroup:
    found = [g for g in groups if bn in g.bns]
    assert len(found) == 1, [g.bn for g in groups]
    return found[0]


def consumer(group: ChannelGroup, module: str) -> Consumer:
    found = [c for c in group.consumers if c.module == module]
    assert len(found) == 1, group.consumers
    return found[0]


def reads_constant(model: nn.Module, group: ChannelGroup, module: str, x: torch.Tensor) -> bool:
    """With γ = 0 at channel 0 of every ranked BN of `group` (β stays), whether `module` reads that
    channel as one value over batch and space: what `Consumer.constant` claims."""
    model = randomized(copy.deepcopy(model))
    with torch.no_grad():
        for name in group.bns:
            model.get_submodule(name).weight[0] = 0
    seen = []
    c = consumer(group, module)
    hook = model.get_submodule(module).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(x)
    hook.remove()
    return is_constant(seen[0][:, c.offset] if seen[0].dim() == 4 else seen[0][:, c.offset:c.offset + c.repeat])


def is_constant(values: torch.Tensor) -> bool:
    """One value per channel over batch and space (up to float rounding); dim 1 is the channel,
    or (a 2-d or 3-d slice of one channel) nothing is."""
    per_channel = values.transpose(0, 1).flatten(1) if values.dim() == 4 else values.flatten()[None]
    spread = per_channel.max(1).values - per_channel.min(1).values
    return bool((spread <= 1e-5 * per_channel.abs().max().clamp(min=1)).all())


# --- one table: the walk and selection detection agree ---------------------------------------------


class StreamHead(nn.Module):
    """A residual stream (its space is coupled: kept with coupled='keep'), then a pre-activation BN
    whose output reaches the head through `op`: with coupled='keep' the BN can only be a selection
    group; with coupled='max' the walk itself follows the stream into the head."""

    def __init__(self, op, head: nn.Module) -> None:  # noqa: ANN001
        super().__init__()
        self.stem, self.bns = nn.Conv2d(3, 6, 1, bias=False), nn.BatchNorm2d(6)  # a free group always
        self.conv0, self.bn0 = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)
        self.op, self.head = op, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.conv0(torch.relu(self.bns(self.stem(x))))))
        x = x + torch.relu(self.bn1(self.conv1(x)))
        return self.head(self.op(torch.relu(self.bn2(x))))


# op between the stream's BN and the head → (head, whether a removed channel reaches it as zero)
HEADS = {
    "sum_keepdim_conv": (lambda x: x.sum(dim=(2, 3), keepdim=True), lambda: nn.Conv2d(8, 4, 1), True),
    "sum_linear": (lambda x: x.sum(dim=(2, 3)), lambda: nn.Linear(8, 4), True),
    "mean_linear": (lambda x: torch.mean(x, (2, 3)), lambda: nn.Linear(8, 4), True),
    "amax_linear": (lambda x: x.amax(dim=(-2, -1)), lambda: nn.Linear(8, 4), True),
    "sum_flatten_linear": (lambda x: torch.flatten(x.sum(3, keepdim=True), 1), lambda: nn.Linear(8 * 8, 4), True),
    "maxpool_flatten_linear": (lambda x: torch.flatten(F.max_pool2d(x, 2), 1), lambda: nn.Linear(8 * 16, 4), True),
    "relu6_conv": (F.relu6, lambda: nn.Conv2d(8, 4, 1), True),
    # a stride-1 pool counting zero padding: the constant arrives as c·P (a profile both follow) ...
    "avgpool_padded_conv": (nn.AvgPool2d(3, stride=1, padding=1), lambda: nn.Conv2d(8, 4, 1), True),
    # ... but not strided, nor through an activation after it: both reach the head with constant=False
    "avgpool_padded_strided_conv": (nn.AvgPool2d(3, stride=2, padding=1), lambda: nn.Conv2d(8, 4, 1), True),
    "avgpool_padded_then_relu6_conv": (lambda x: F.relu6(F.avg_pool2d(x, 3, 1, 1)), lambda: nn.Conv2d(8, 4, 1), True),
    "sigmoid_conv": (torch.sigmoid, lambda: nn.Conv2d(8, 4, 1), False),  # f(0) ≠ 0
    "channel_sum_conv": (lambda x: x.sum(dim=1, keepdim=True), lambda: nn.Conv2d(1, 4, 1), False),  # not spatial
}


@pytest.mark.parametrize("case", list(HEADS))
def test_the_walk_and_selection_detection_share_the_op_table(case: str) -> None:
    op, head, passes = HEADS[case]
    model, x = StreamHead(op, head()), image()
    walked = derive_groups(model, x, coupled="max")  # the walk follows the stream into the head
    selected = derive_groups(model, x, coupled="keep")  # the stream is kept: only a selection can reach it
    heads_walked = [c for g in walked.groups for c in g.consumers if c.module == "head"]
    selection = [g for g in selected.groups if g.bn == "bn2"]
    assert bool(heads_walked) == bool(selection) == passes, (heads_walked, selection)
    if passes:  # and they read the same columns, as a constant or not alike
        assert selection[0].selection == "bn2.select" and selection[0].consumers == tuple(heads_walked)
        assert selected.selections == ("bn2",)
        assert heads_walked[0].constant is (case not in ("avgpool_padded_strided_conv", "avgpool_padded_then_relu6_conv"))
        assert heads_walked[0].profile == (((3, 3, 1, 1),) if case == "avgpool_padded_conv" else ())
        notes = [r["constant_note"] for r in space_rows(selected) if r["kind"] == "selection"]
        assert notes == [None] if heads_walked[0].constant else \
            "with zero padding and a stride" in notes[0] or "relu6 (relu6) after a zero-padded average pool" in notes[0]


def test_a_selection_through_a_spatial_sum_prunes_exactly() -> None:
    """The drift this table removed: the walk passed `sum` over space, selection detection did not.
    Selecting channels before the sum is exact: the head reading the kept channels only computes
    what it computes with γ and β zeroed at the others (done by hand here, independent of surgery)."""
    op, head, _ = HEADS["sum_keepdim_conv"]
    model, x = StreamHead(op, head()), image()
    result = derive_groups(model, x)
    assert result.selections == ("bn2",)
    assert group_of(result.groups, "bn2").consumers == (Consumer("head"),)
    randomized(result.prepare(model))
    keep = torch.tensor([0, 2, 3, 6])
    removed = torch.tensor([1, 4, 5, 7])
    ref = copy.deepcopy(model)
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        ref.bn2.weight[removed] = 0
        ref.bn2.bias[removed] = 0
        pruned.bn2.select.indices = keep
        pruned.head.weight = nn.Parameter(model.head.weight[:, keep].clone())
        pruned.head.in_channels = len(keep)
        out, out_ref, out_orig = pruned(x), ref(x), model(x)
    assert float((out - out_ref).abs().max()) < 1e-5 * float(out_ref.abs().max())
    assert float((out_ref - out_orig).abs().max()) > 1e-3 * float(out_orig.abs().max())


# --- the table's flags are what the ops do -----------------------------------------------------------

PER_CHANNEL = {
    "relu": nn.ReLU(),
    "sigmoid": nn.Sigmoid(),
    "maxpool_padded": nn.MaxPool2d(3, stride=1, padding=1),
    "avgpool": nn.AvgPool2d(2),
    "avgpool_padded": nn.AvgPool2d(3, stride=1, padding=1),
    "avgpool_padded_exclusive": nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
    "avgpool_padded_divisor": nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False, divisor_override=4),
    "adaptive_avgpool": nn.AdaptiveAvgPool2d(3),
    "f_avg_pool2d_padded": lambda x: F.avg_pool2d(x, 3, 1, 1),
    "f_avg_pool2d_exclusive": lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False),
    "dropout": nn.Dropout(0.5),
    "depthwise_padded": nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
    "depthwise_unpadded": nn.Conv2d(4, 4, 3, groups=4),
    "depthwise_reflect": nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect", bias=False),
}


class One(nn.Module):
    def __init__(self, op) -> None:  # noqa: ANN001
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


@pytest.mark.parametrize("case", list(PER_CHANNEL))
def test_per_channel_flags_match_what_the_op_does(case: str) -> None:
    model = One(PER_CHANNEL[case]).eval()
    constant = torch.full((2, 4, 7, 7), 0.7) * torch.arange(1.0, 5.0)[None, :, None, None]  # per channel
    gm = trace_graph(model, constant)
    (node,) = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    rule = classify(node, dict(gm.named_modules()), call_counts(gm.graph))
    assert rule.op in (Op.PER_CHANNEL, Op.DEPTHWISE)
    with torch.no_grad():
        out, zero = model(constant), model(torch.zeros(2, 4, 7, 7))
    if rule.profile is not None:  # a stride-1 pool counting zero padding: c·P, P rebuilt from the rule alone
        shape = profile_map([rule.profile], tuple(out.shape[-2:]), out)
        assert not is_constant(out) and torch.allclose(out, constant[:, :, :1, :1] * shape)
    else:
        assert rule.constant == is_constant(out)
    assert rule.zero == bool((zero == 0).all())
    assert rule.constant or rule.note  # a non-constant rule names itself for --explain


def test_spatial_reductions_only_are_reductions() -> None:
    class Reductions(nn.Module):
        def forward(self, x: torch.Tensor):  # noqa: ANN201
            return x.sum(dim=(2, 3), keepdim=True), torch.mean(x, (2, 3)), x.amax(-1), x.sum(1), x.mean()

    gm = trace_graph(Reductions(), torch.zeros(2, 4, 5, 5))
    modules, calls = dict(gm.named_modules()), call_counts(gm.graph)
    ops = [classify(n, modules, calls).op for n in gm.graph.nodes if n.op == "call_method" or n.op == "call_function"]
    assert ops == [Op.REDUCE, Op.REDUCE, Op.REDUCE, Op.UNKNOWN, Op.UNKNOWN]


# --- constant preservation: Consumer.constant and its explanation ---------------------------------


class Chain(nn.Module):
    """conv → BN → ReLU → pool → conv → BN → ReLU → 1×1 conv."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool = pool
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        return self.head(torch.relu(self.bn2(self.conv2(x))))


@pytest.mark.parametrize(("pool", "constant"), [
    (nn.MaxPool2d(3, stride=1, padding=1), True),
    # count_include_pad=True: zeros in border averages. At stride 1 that is followed as a profile
    # (c·P, test_per_channel_flags_match_what_the_op_does); strided, it is not constant.
    (nn.AvgPool2d(3, stride=2, padding=1), False),
    (nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), True),
])
def test_consumer_constant_through_pools_and_the_explain_row(pool: nn.Module, constant: bool) -> None:
    model, x = Chain(pool), image()
    result = derive_groups(model, x)
    group = group_of(result.groups, "bn1")
    assert consumer(group, "conv2").constant is constant and consumer(group, "conv2").profile == ()
    assert reads_constant(model, group, "conv2", x) is constant  # the flag says what happens
    assert consumer(group_of(result.groups, "bn2"), "head").constant
    (row,) = [r for r in space_rows(result) if r["bns"] == ["bn1"]]
    other = [r for r in space_rows(result) if r["bns"] == ["bn2"]]
    assert other[0]["constant_note"] is None
    if constant:
        assert row["constant_note"] is None
    else:
        assert "'conv2'" in row["constant_note"] and "AvgPool2d 'pool'" in row["constant_note"]
        assert "zero padding" in row["constant_note"]
    assert set(row) >= {"kind", "width", "bns", "members", "pruned", "reason", "constant_note"}


class Depthwise(nn.Module):
    """pointwise → BN → ReLU → depthwise 3×3 (zero padding) → [BN → ReLU] → pointwise."""

    def __init__(self, bn_after: bool) -> None:
        super().__init__()
        self.pw1, self.bn1 = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        # Without the BN no ReLU either: a ReLU could clip the border effects away on some seeds.
        self.bn2, self.act = (nn.BatchNorm2d(8), nn.ReLU()) if bn_after else (nn.Identity(), nn.Identity())
        self.pw2 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(torch.relu(self.bn1(self.pw1(x))))
        return self.pw2(self.act(self.bn2(x)))


def test_a_bn_after_a_depthwise_conv_makes_its_output_constant_again() -> None:
    model, x = Depthwise(bn_after=True), image()
    result = derive_groups(model, x)
    group = group_of(result.groups, "bn1")
    assert group.bns == ("bn1", "bn2")
    assert consumer(group, "pw2").constant
    assert reads_constant(model, group, "pw2", x)
    assert all(r["constant_note"] is None for r in space_rows(result))


def test_a_depthwise_conv_without_a_bn_after_it_is_not_constant() -> None:
    model, x = Depthwise(bn_after=False), image()
    result = derive_groups(model, x)
    group = group_of(result.groups, "bn1")
    assert group.bns == ("bn1",)
    assert not consumer(group, "pw2").constant
    assert not reads_constant(model, group, "pw2", x)
    (note,) = [r["constant_note"] for r in space_rows(result) if r["bns"] == ["bn1"]]
    assert "'pw2'" in note and "depthwise Conv2d 'dw'" in note


class Gated(nn.Module):
    """An SE-style gate: x · sigmoid(fc(mean(x))) — a removed channel's β times an input-dependent factor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.squeeze, self.expand = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        # (no ReLU inside the gate: on some inits it would zero the squeeze and make the gate a constant)
        gate = torch.sigmoid(self.expand(self.squeeze(x.mean((2, 3), keepdim=True))))
        return self.head(x * gate)


def test_a_gate_product_is_not_constant_but_the_squeeze_reads_a_constant() -> None:
    model, x = Gated(), image()
    result = derive_groups(model, x)
    group = group_of(result.groups, "bn1")
    assert consumer(group, "squeeze").constant and not consumer(group, "head").constant
    assert reads_constant(model, group, "squeeze", x) and not reads_constant(model, group, "head", x)
    # … but c·g(x) for the gate the walk read off the graph, which compensation follows (no note)
    assert consumer(group, "head").gate == ("expand", (("sigmoid", 0.0, 0.0),))
    (note,) = [r["constant_note"] for r in space_rows(result) if r["bns"] == ["bn1"]]
    assert note is None


def test_a_residual_add_of_constants_stays_constant() -> None:
    model, x = StreamHead(lambda t: t, nn.Conv2d(8, 4, 1)), image()
    result = derive_groups(model, x, coupled="max")
    group = group_of(result.groups, "bn0")
    assert group.coupled and set(group.bns) == {"bn0", "bn1", "bn2"}
    assert all(c.constant for c in group.consumers) and consumer(group, "head")
    assert reads_constant(model, group, "head", x)
