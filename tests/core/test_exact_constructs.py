"""Exact means exact, construct by construct: one tiny module per way a removed channel can reach a
consumer. For each, `prune_model(…, compensate="exact")` equals the original with the removed
channels' γ zeroed and `none` equals it with γ and β zeroed, at two input sizes (the responses are
rebuilt per size), and the measured exactness it returns agrees.

Each net is stem conv → BN → ReLU → the construct → a consumer → BN → ReLU → pool → Linear; half of
every BN's channels get γ ≈ 0 with β kept (`strongly_sparse`), so the constants matter.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import masked_reference, rel_err, strongly_sparse
from slimctl.base.gates import gate_rows_of
from slimctl.base.inserted import ConstantResponse, response_of
from slimctl.core.surgery import prune_model

C = 8  # channels of the construct's space


def bn_relu(channels: int = C) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())


class Net(nn.Module):
    """stem → BN → ReLU → `body` (reads C channels) → BN → ReLU → pool → Linear."""

    def __init__(self, body: nn.Module, out: int = C) -> None:
        super().__init__()
        self.stem, self.act = nn.Conv2d(3, C, 3, padding=1, bias=False), bn_relu()
        self.body, self.post = body, bn_relu(out)
        self.head = nn.Linear(out, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.post(self.body(self.act(self.stem(x)))).mean((2, 3)))


class Then(nn.Module):
    """`op` (a function of the tensor), then `conv`."""

    def __init__(self, op, conv: nn.Module) -> None:  # noqa: ANN001
        super().__init__()
        self.op, self.conv = op, conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.op(x))


class Concat(nn.Module):
    """Two branches, each conv → BN → ReLU, concatenated, read by one 3×3 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.a_act = nn.Conv2d(C, 4, 1, bias=False), bn_relu(4)
        self.b, self.b_act = nn.Conv2d(C, 6, 3, padding=1, bias=False), bn_relu(6)
        self.conv = nn.Conv2d(10, C, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.a_act(self.a(x)), F.avg_pool2d(self.b_act(self.b(x)), 3, 1, 1)], 1))


class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle between the BN and a 1×1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return self.conv(x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w))


class SE(nn.Module):
    """x · gate(fc2(relu(fc1(mean(x))))) read by `project` (squeeze-and-excitation)."""

    def __init__(self, gate, project: nn.Module) -> None:  # noqa: ANN001
        super().__init__()
        self.fc1, self.fc2, self.gate, self.project = nn.Conv2d(C, 4, 1), nn.Conv2d(4, C, 1), gate, project

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x * self.gate(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True))))))


class ResidualSE(nn.Module):
    """A residual add of two BN outputs (a coupled space), then an SE gate, then a 1×1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.branch, self.branch_bn = nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)
        self.se = SE(nn.Sigmoid(), nn.Conv2d(C, C, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(torch.relu(x + self.branch_bn(self.branch(x))))


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return F.relu6(x + 3.0) / 6.0  # timm's, traced as add → relu6 → div


CONSTRUCTS = {
    "grouped_consumer": lambda: nn.Conv2d(C, C, 3, padding=1, groups=2),
    "grouped_consumer_4": lambda: nn.Conv2d(C, 12, 3, padding=1, groups=4, bias=False),
    "depthwise": lambda: nn.Sequential(nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False), bn_relu(),
                                       nn.Conv2d(C, C, 1)),
    "dilated": lambda: nn.Conv2d(C, C, 3, padding=2, dilation=2),
    "strided_padded": lambda: nn.Conv2d(C, C, 3, stride=2, padding=1),
    "reflect": lambda: nn.Conv2d(C, C, 3, padding=1, padding_mode="reflect"),
    "valid_string": lambda: nn.Conv2d(C, C, 3, padding="valid"),
    "replicate_strided": lambda: nn.Conv2d(C, C, 3, stride=2, padding=1, padding_mode="replicate"),
    "same_string_dilated": lambda: nn.Conv2d(C, C, 3, padding="same", dilation=2),
    "avg_pool_padded": lambda: Then(lambda x: F.avg_pool2d(x, 3, 1, 1), nn.Conv2d(C, C, 3, padding=1)),
    "avg_pool_padded_twice": lambda: Then(nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.AvgPool2d(5, 1, 2)),
                                          nn.Conv2d(C, C, 1)),
    "avg_pool_exclusive": lambda: Then(nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.Conv2d(C, C, 3, padding=1)),
    "avg_pool_padded_strided": lambda: Then(nn.AvgPool2d(3, 2, 1), nn.Conv2d(C, C, 1)),
    "max_pool": lambda: Then(nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.Conv2d(C, C, 3, padding=1)),
    "upsample_nearest": lambda: Then(lambda x: F.interpolate(x, scale_factor=2.0), nn.Conv2d(C, C, 3, padding=1)),
    "upsample_bilinear": lambda: Then(nn.Upsample(scale_factor=2.0, mode="bilinear"), nn.Conv2d(C, C, 3, padding=1)),
    "concat": Concat,
    "channel_shuffle": Shuffle,
    "se_sigmoid": lambda: SE(nn.Sigmoid(), nn.Conv2d(C, C, 1)),
    "se_hardsigmoid_padded_consumer": lambda: SE(nn.Hardsigmoid(), nn.Conv2d(C, C, 3, padding=1)),
    "se_traced_hard_sigmoid": lambda: SE(hard_sigmoid, nn.Conv2d(C, C, 1, bias=False)),
}
# Constructs whose space cannot shrink, or whose removed channels arrive in a form no term follows:
# their channels are kept, and the model stays exact.
KEPT = {"channel_shuffle", "avg_pool_padded_strided"}


def pruned_and_references(model: nn.Module, mode: str, coupled: str = "keep"):
    pruned, plan, exactness, notes = prune_model(model, 0.5, compensate=mode, coupled=coupled)
    return pruned.eval(), plan, exactness, notes, masked_reference(model, plan, zero_beta=mode == "none")


def outputs(model: nn.Module, size: int) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size)))


@pytest.mark.parametrize("construct", list(CONSTRUCTS))
def test_exact_and_none_hold_for_every_construct_at_two_sizes(construct: str) -> None:
    model = strongly_sparse(Net(CONSTRUCTS[construct](), out=12 if construct == "grouped_consumer_4" else C))
    model.arch_spec = {"arch": None, "input_size": (3, 16, 16)}  # the probe size; checked at 16 and 21
    for mode in ("none", "exact"):
        pruned, plan, exactness, notes, reference = pruned_and_references(model, mode)
        assert exactness.exact and exactness.max_rel_diff < 1e-5, (mode, exactness)
        for size in (16, 21):
            assert rel_err(outputs(pruned, size), outputs(reference, size)) < 1e-5, (mode, size)
    # the construct's space (ranked by act.0, the stem's BN) lost channels, unless it must keep them
    stem = [gp for gp in plan.groups if gp.group.bn == "act.0"]
    assert bool(stem and stem[0].kept < stem[0].total) is (construct not in KEPT), (stem, notes)
    if construct in KEPT:
        return
    # and the removed constants mattered: literal removal is not the γ-zeroed original
    literal, *_ = prune_model(model, 0.5, compensate="none")
    assert rel_err(outputs(literal.eval(), 16), outputs(masked_reference(model, plan, zero_beta=False), 16)) > 1e-3


def test_a_gate_after_a_residual_add_is_exact_when_the_coupled_set_is_pruned() -> None:
    model = strongly_sparse(Net(ResidualSE()))
    model.arch_spec = {"arch": None, "input_size": (3, 16, 16)}
    pruned, plan, exactness, _, reference = pruned_and_references(model, "exact", coupled="max")
    coupled = [gp for gp in plan.groups if gp.group.coupled]
    assert coupled and coupled[0].kept < coupled[0].total
    assert gate_rows_of(pruned.body.se.fc2) is not None and response_of(pruned.body.se.project).source == "body.se.fc2"
    for size in (16, 21):
        assert rel_err(outputs(pruned, size), outputs(reference, size)) < 1e-5
    assert exactness.exact


def test_the_gate_term_costs_what_the_removed_channels_cost() -> None:
    """The gate's kept rows and the consumer's gated columns: one per removed channel, no more."""
    model = strongly_sparse(Net(SE(nn.Sigmoid(), nn.Conv2d(C, C, 1))))
    model.arch_spec = {"arch": None, "input_size": (3, 16, 16)}
    pruned, plan, *_ = prune_model(model, 0.5)
    (space,) = [gp for gp in plan.groups if gp.group.bn == "act.0"]
    removed = space.total - space.kept
    assert gate_rows_of(pruned.body.fc2).weight.shape[0] == removed
    assert response_of(pruned.body.project).gate_weight.shape[1] == removed
    assert pruned.body.fc2.out_channels == space.kept


def test_a_1x1_gated_consumer_adds_its_whole_term_at_once_as_the_term_by_term_path_would(monkeypatch) -> None:
    """A gate's 1×1 conv on the pooled map and a 1×1 consumer take the matrix-product path (two ops
    per forward, for deployed SE models); its result is the general per-term path's, folded or not."""
    from slimctl.base import gates, inserted
    from slimctl.core.fold import fold_bn

    model = strongly_sparse(Net(SE(nn.Sigmoid(), nn.Conv2d(C, C, 1))))
    model.arch_spec = {"arch": None, "input_size": (3, 16, 16)}
    pruned, *_ = prune_model(model, 0.5)
    response = response_of(pruned.body.project)
    with torch.no_grad():  # every term in play (here the removed channels reach the consumer gated only)
        response.kernel.normal_(generator=torch.Generator().manual_seed(0))
        response.bias.normal_(generator=torch.Generator().manual_seed(1))
    for net in (pruned.eval(), fold_bn(pruned)):
        fast = outputs(net, 21)
        assert response_of(net.body.project)._uniform is not None
        with monkeypatch.context() as patched:
            patched.setattr(inserted, "reads_alike", lambda layer: False)
            patched.setattr(gates, "pointwise", lambda layer: False)
            response_of(net.body.project).refresh()  # it read its layer once
            assert rel_err(fast, outputs(net, 21)) < 1e-6
        response_of(net.body.project).refresh()
    # the kept matrix-product terms follow the buffers: an in-place edit, a dtype change
    rows = gate_rows_of(pruned.body.fc2)
    before = outputs(pruned, 21)
    with torch.no_grad():
        rows.weight.mul_(3.0)
        rows.bias.add_(1.0)
    edited = outputs(pruned, 21)
    assert rel_err(edited, before) > 1e-3
    with torch.no_grad():
        doubled = pruned.double()(torch.randn(2, 3, 21, 21, generator=torch.Generator().manual_seed(21)).double())
    assert rel_err(doubled, edited.double()) < 1e-5
    assert rows.product_terms(torch.float64)[0].dtype == torch.float64


def test_a_gated_prune_survives_a_checkpoint_round_trip_and_fine_tuning(tmp_path) -> None:
    from slimctl import load_model, make_checkpoint, save_checkpoint
    from slimctl.models import create_model

    model = strongly_sparse(create_model("torchvision.mobilenet_v3_small", 10, input_size=(3, 64, 64)))
    pruned, plan, exactness, _ = prune_model(model, 0.5)
    assert exactness.exact and any(gate_rows_of(m) is not None for m in pruned.modules())
    save_checkpoint(tmp_path / "p.pt", make_checkpoint(pruned, stage="prune"))
    loaded = load_model(tmp_path / "p.pt")  # rebuilt from widths: gate rows linked before the weights load
    assert torch.equal(outputs(loaded, 64), outputs(pruned.eval(), 64))
    # fine-tuning: gradients reach the gate's input through the kept rows' term, and nothing lingers
    loaded.train()
    loaded(torch.randn(2, 3, 64, 64)).square().mean().backward()
    responses = [response_of(m) for m in loaded.modules() if response_of(m) is not None]
    assert responses and all(r._gate is None for r in responses)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_a_gated_prune_exports_with_parity(tmp_path, fmt: str) -> None:
    """The gate rows run in exported programs too (no tensor is read as Python data in a forward)."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    from slimctl import make_checkpoint, save_checkpoint
    from slimctl.models import create_model
    from slimctl.pipeline.export import export_checkpoint

    model = strongly_sparse(create_model("torchvision.mobilenet_v3_small", 10, input_size=(3, 64, 64)))
    pruned = prune_model(model, 0.5).model
    save_checkpoint(tmp_path / "p.pt", make_checkpoint(pruned, stage="prune"))
    out = export_checkpoint(tmp_path / "p.pt", tmp_path / f"m.{fmt}", fmt=fmt)  # raises on a parity failure
    assert (tmp_path / f"m.{fmt}").stat().st_size > 1000 and out["format"] == fmt


@pytest.mark.parametrize("construct", ["reflect", "valid_string", "dilated"])
def test_a_constant_read_alike_everywhere_is_a_bias_and_a_padded_read_is_per_position(construct: str) -> None:
    model = strongly_sparse(Net(CONSTRUCTS[construct]()))
    model.arch_spec = {"arch": None, "input_size": (3, 16, 16)}
    pruned = prune_model(model, 0.5).model
    response = response_of(pruned.body)
    if construct == "dilated":  # zero padding reaches the kernel: the border values differ
        assert response is not None and response.kernel.numel()
    else:  # reflect and 'valid' read the constant alike everywhere: folded into the conv's own bias
        assert response is None and not torch.equal(pruned.body.bias, model.body.bias)


@pytest.mark.parametrize("construct", ["avg_pool_padded_twice", "se_hardsigmoid_padded_consumer"])
def test_profiled_and_gated_terms_run_in_an_exported_program(construct: str) -> None:
    """torch.export (under ONNX and pt2 export) cannot read a tensor's values in a forward: the
    profile and the gate ops are read into plain Python once, when they are written or loaded."""
    model = strongly_sparse(Net(CONSTRUCTS[construct]()))
    model.arch_spec = {"arch": None, "input_size": (3, 16, 16)}
    pruned = prune_model(model, 0.5).model.eval()
    x = torch.randn(2, 3, 16, 16)
    program = torch.export.export(pruned, (x,))
    with torch.no_grad():
        assert rel_err(program.module()(x), pruned(x)) < 1e-5


@pytest.mark.parametrize("construct", ["se_sigmoid", "se_hardsigmoid_padded_consumer", "avg_pool_padded",
                                       "strided_padded"])
def test_removed_channels_that_read_zero_add_no_term_and_stay_exact(construct: str) -> None:
    """β = 0 before a ReLU (as initialised), or β < 0: the removed channels emit 0, so
    no consumer gets a term or gate rows to run each forward; where they emit c ≠ 0, the terms are there."""
    def built(beta: float) -> nn.Module:
        model = strongly_sparse(Net(CONSTRUCTS[construct]()))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.data.fill_(beta)  # so the removed channels' β too: relu(-0.3) = relu(0) = 0
        model.arch_spec = {"arch": None, "input_size": (3, 16, 16)}
        return model

    counted = {}
    for beta in (0.0, -0.3, 0.4):
        model = built(beta)
        pruned, plan, exactness, notes, reference = pruned_and_references(model, "exact")
        assert exactness.exact and rel_err(outputs(pruned, 21), outputs(reference, 21)) < 1e-5, (beta, notes)
        counted[beta] = (sum(isinstance(m, ConstantResponse) for m in pruned.modules()),
                         sum(gate_rows_of(m) is not None for m in pruned.modules()))
    assert counted[0.0] == counted[-0.3] == (0, 0) and counted[0.4][0] > 0, counted
