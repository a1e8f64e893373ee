"""slimctl.fold_bn: the folded model computes what the eval-mode model computes, for every family and
for traced torchvision models, pruned (with β compensation) and not; exactly the BNs that cannot be
folded stay; the input model is left alone; `slimctl bench --fold-bn/--no-fold-bn`."""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import ROOT, randomize_bn, rel_err, run
from slimctl import fold_bn, make_checkpoint, prune_model, save_checkpoint
from slimctl.errors import SlimctlError
from slimctl.core.fold import fold_plan
from slimctl.base.inserted import ChannelSelection, response_of, selection_of
from slimctl.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def bn_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def preact_left(model: nn.Module) -> set[str]:
    """Pre-activation ResNet: each block's bn1 reads the residual stream (an add; the first block's
    stem output also feeds the downsample) and the head BN reads the last add."""
    return {n for n in bn_names(model) if n.endswith(".bn1") or n == "head.bn"}


# name → (arch, create_model kwargs, input sizes, the BNs expected to stay)
MODELS = {
    "vgg": ("vgg11", {"width": 0.25}, (32, 48), lambda m: set()),
    "preresnet": ("preresnet", {"width": 0.25, "depth": 20}, (32, 48), preact_left),
    "densenet": ("densenet", {"width": 0.5, "depth": 10}, (32, 48), bn_names),  # every BN reads a concat
    "resnet164": ("resnet164", {"width": 0.125}, (32, 40), preact_left),
    "resnet18": ("torchvision.resnet18", {}, (64, 80), lambda m: set()),
    "mobilenet_v2": ("torchvision.mobilenet_v2", {}, (64, 80), lambda m: set()),
    # depthwise convs, channel shuffle, and BNs with inserted selections (folded, the gather kept)
    "shufflenet": ("torchvision.shufflenet_v2_x0_5", {}, (64, 80), lambda m: set()),
    "resnext": ("torchvision.resnext50_32x4d", {}, (64, 80), lambda m: set()),  # grouped convs
}


@functools.lru_cache(maxsize=None)
def _built(name: str, pruned: bool) -> nn.Module:
    arch, kwargs, sizes, _ = MODELS[name]
    torch.manual_seed(0)
    model = randomize_bn(create_model(arch, 10, input_size=(3, sizes[0], sizes[0]), **kwargs)).eval()
    if pruned:  # compensate="exact": ConstantResponse on the consumers, per position where padded
        model, _, *_ = prune_model(model, 0.5)
        randomize_bn(model, seed=1)  # the kept BNs' statistics differ from the original's too
    return model.eval()


def built(name: str, pruned: bool) -> nn.Module:
    return copy.deepcopy(_built(name, pruned))


@pytest.mark.parametrize("pruned", [False, True], ids=["unpruned", "pruned"])
@pytest.mark.parametrize("name", list(MODELS))
def test_folded_equals_unfolded(name: str, pruned: bool) -> None:
    model = built(name, pruned)
    _, _, sizes, expected_left = MODELS[name]
    before = copy.deepcopy(model.state_dict())
    folded = fold_bn(model)

    # The input model is unchanged (weights, BN statistics, compensation, modules).
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(before) == set(model.state_dict())
    assert not folded.training

    # Exactly the BNs that cannot be folded stay.
    left = bn_names(folded)
    assert left == expected_left(model), sorted(left ^ expected_left(model))
    assert set(fold_plan(model).kept) == left
    folds = fold_plan(model).folds
    assert len(folds) == len(bn_names(model)) - len(left)
    for layer, bn in folds:  # a selection inserted into a folded BN stays, as the gather
        expected = ChannelSelection if selection_of(model.get_submodule(bn)) is not None else nn.Identity
        assert type(folded.get_submodule(bn)) is expected
        assert folded.get_submodule(layer).bias is not None
    if pruned and folds:  # the constant response of a folded layer is scaled with it
        assert any(response_of(model.get_submodule(layer)) is not None for layer, _ in folds)

    gen = torch.Generator().manual_seed(2)
    for size in (*sizes, sizes[0]):  # the per-position compensation is cached per input size
        x = torch.randn(2, 3, size, size, generator=gen)
        assert rel_err(outputs(folded, x), outputs(model, x)) < 1e-5, size


def test_float64_fold_is_exact_to_rounding() -> None:
    """In float64 the folded pruned VGG matches to 1e-12: the algebra is exact, not just close."""
    model = built("vgg", pruned=True).double()
    folded = fold_bn(model)
    assert all(p.dtype == torch.float64 for p in folded.parameters())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert rel_err(outputs(folded, x), outputs(model, x)) < 1e-12
    assert rel_err(outputs(fold_bn(built("vgg", pruned=True)).double(), x), outputs(model, x)) > 1e-9


def test_response_is_scaled_with_the_layer() -> None:
    """Pruned VGG: the folded conv's ConstantResponse (bias and per-position kernel) is the original's
    times the BN's per-channel scale γ/√(var+ε)."""
    model = built("vgg", pruned=True)
    folded = fold_bn(model, carry_maps=False)
    responses = [(n, response_of(m)) for n, m in model.named_modules() if response_of(m) is not None]
    convs = [(n, r) for n, r in responses if isinstance(model.get_submodule(n), nn.Conv2d)]
    assert convs and all(r.kernel.numel() for _, r in convs)  # exact compensation: per position
    for name, response in convs:
        bn = model.get_submodule(name.replace("conv", "bn"))
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        got = response_of(folded.get_submodule(name))
        torch.testing.assert_close(got.bias, response.bias * scale)
        torch.testing.assert_close(got.kernel, response.kernel * scale[:, None, None])


@pytest.mark.parametrize("arch, kwargs", [("vgg11", {"width": 0.25}), ("torchvision.mobilenet_v2", {})])
def test_a_per_channel_response_joins_the_folded_bias(arch: str, kwargs: dict) -> None:
    """`--compensate bias` leaves per-channel terms only; folded, they move into the layers' biases
    and their hooks go, so the deployed model has no extra add, and computes the same."""
    torch.manual_seed(0)
    size = 32 if arch == "vgg11" else 64
    model = randomize_bn(create_model(arch, 10, input_size=(3, size, size), **kwargs)).eval()
    pruned = prune_model(model, 0.5, compensate="bias")[0].eval()
    assert any(response_of(m) is not None for m in pruned.modules())
    folded = fold_bn(pruned)
    left = [n for n, m in folded.named_modules() if response_of(m) is not None]
    folded_layers = {layer for layer, _ in fold_plan(pruned).folds}
    assert not folded_layers & set(left)  # only layers whose BN stays keep theirs (none here)
    assert all(not any(h.__name__ == "_response_hook" for h in folded.get_submodule(n)._forward_hooks.values())
               for n in folded_layers)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4))
    assert rel_err(outputs(folded, x), outputs(pruned, x)) < 1e-5


class Mixed(nn.Module):
    """Foldable and unfoldable pairs side by side."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_bias = nn.Conv2d(3, 4, 3, padding=1, bias=True)
        self.bn_bias = nn.BatchNorm2d(4)  # folded (the conv's own bias too)
        self.conv_twice = nn.Conv2d(4, 4, 1, bias=False)
        self.bn_twice = nn.BatchNorm2d(4)  # stays: its conv's output also feeds the add
        self.bn_add = nn.BatchNorm2d(4)  # stays: reads an add
        self.conv_plain = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False)
        self.bn_plain = nn.BatchNorm2d(4, affine=False)  # folded: γ = 1, β = 0
        self.conv_batchstats = nn.Conv2d(4, 4, 1, bias=False)
        self.bn_batchstats = nn.BatchNorm2d(4, track_running_stats=False)  # stays: batch statistics
        self.conv_hooked = nn.Conv2d(4, 4, 1, bias=False)
        self.bn_hooked = nn.BatchNorm2d(4)  # stays: a hook slimctl did not put there reads the conv output
        self.conv_hooked.register_forward_hook(lambda m, i, o: o * 2)
        self.fc = nn.Linear(4, 6)
        self.bn1d = nn.BatchNorm1d(6)  # folded: a 2-d Linear output
        self.fc_seq = nn.Linear(5, 4)
        self.bn1d_seq = nn.BatchNorm1d(4)  # stays: on a 3-d output it normalizes dim 1, fc's features are dim 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.relu(self.bn_bias(self.conv_bias(x)))
        y = self.conv_twice(x)
        x = self.bn_add(self.bn_twice(y) + y)
        x = self.bn_plain(self.conv_plain(x))
        x = self.bn_batchstats(self.conv_batchstats(x)) + self.bn_hooked(self.conv_hooked(x))
        head = self.bn1d(self.fc(x.mean((2, 3))))
        seq = self.bn1d_seq(self.fc_seq(x.flatten(2)[:, :, :5]))  # (N, 4, 5) → (N, 4, 4)
        return head, seq


def test_which_pairs_fold_and_why_the_others_stay() -> None:
    torch.manual_seed(0)
    model = Mixed().eval()
    with torch.no_grad():  # random γ, β and statistics (randomize_bn needs affine BatchNorm2d)
        for bn in model.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                if bn.affine:
                    bn.weight.uniform_(0.5, 1.5), bn.bias.normal_()
                if bn.track_running_stats:
                    bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    plan = fold_plan(model, x)
    assert sorted(plan.folds) == [("conv_bias", "bn_bias"), ("conv_plain", "bn_plain"), ("fc", "bn1d")]
    assert "also read by add" in plan.kept["bn_twice"]
    assert "its input is add" in plan.kept["bn_add"]
    assert "batch statistics" in plan.kept["bn_batchstats"]
    assert "hooks slimctl did not insert" in plan.kept["bn_hooked"]
    assert "3-d output" in plan.kept["bn1d_seq"]
    folded = fold_bn(model, x)
    assert bn_names(folded) == {"bn_twice", "bn_add", "bn_batchstats", "bn_hooked", "bn1d_seq"}
    assert folded.conv_plain.bias is not None and model.conv_plain.bias is None
    for got, want in zip(outputs(folded, x), outputs(model, x)):
        assert rel_err(got, want) < 1e-5


def test_model_without_bn_and_untraceable_model() -> None:
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).train()
    folded = fold_bn(plain)
    assert folded is not plain and not folded.training and plain.training

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) if x.sum() > 0 else x  # data-dependent: fx cannot trace it

    with pytest.raises(SlimctlError, match="cannot trace Branchy"):
        fold_bn(Branchy(), torch.zeros(1, 3, 8, 8))


# --- slimctl bench --fold-bn / --no-fold-bn --------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fold")
    base, pruned = _built("vgg", False), _built("vgg", True)
    save_checkpoint(root / "base.pt", make_checkpoint(base, stage="sparse-train"))
    save_checkpoint(root / "pruned.pt", make_checkpoint(pruned, stage="prune"))
    return root / "base.pt", root / "pruned.pt"


def test_bench_folds_by_default(checkpoints, monkeypatch):
    import slimctl.pipeline.bench

    timed: list[set[str]] = []  # the BNs of each model bench times
    real = slimctl.pipeline.bench.latency_timer
    monkeypatch.setattr(slimctl.pipeline.bench, "latency_timer", lambda model, **kw: (timed.append(bn_names(model)),
                                                                           real(model, **kw))[1])
    args = ("bench", *checkpoints, "--batch-sizes", "1", "--repeats", "1", "--precision", "fp32", "--json")
    folded = json.loads(run(*args).output)
    assert timed == [set(), set()]  # VGG: every BN folded
    unfolded = json.loads(run(*args, "--no-fold-bn").output)
    assert all(len(t) == 8 for t in timed[2:]) and len(timed) == 4
    assert [r["fold_bn"] for r in folded] == [True, True] and [r["bns_folded"] for r in folded] == [8, 8]
    assert [r["fold_bn"] for r in unfolded] == [False, False] and [r["bns_folded"] for r in unfolded] == [0, 0]
    for a, b in zip(folded, unfolded):  # params and FLOPs are the checkpoint's either way
        assert (a["params"], a["flops"]) == (b["params"], b["flops"])
    assert "BNs folded" in run(*args[:-1]).output
    assert "BNs not folded" in run(*args[:-1], "--no-fold-bn").output


@pytest.mark.parametrize("runtime, batch_sizes", [("torch", "1,2"), ("onnxruntime", "1")])  # an ONNX export per batch
def test_bench_compensate_times_the_three_modes_of_one_prune(checkpoints, runtime, batch_sizes):
    """scripts/bench_compensate.py: the README's cost of the exact term (ms per mode, vs none)."""
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime")
    script = ROOT / "scripts" / "bench_compensate.py"
    done = subprocess.run([sys.executable, script, checkpoints[0], "--ratio", "0.5", "--batch-sizes", batch_sizes,
                           "--repeats", "1", "--rounds", "2", "--precision", "fp32", "--runtime", runtime],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    rows = {line.split(" | ")[0][2:]: line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert {"none", "exact", "bias"} <= set(rows)
    assert rows["none"].startswith("| none | 0 (+0.00%) |") and rows["none"].count("(1.00×)") == len(batch_sizes.split(","))
    assert "| bias | 0 (+0.00%) |" in rows["bias"]  # folded into the convs' biases: nothing added
    assert not rows["exact"].startswith("| exact | 0 ")  # the per-position terms stay


@pytest.mark.parametrize("name", ["vgg", "resnet18"])
def test_per_position_terms_are_carried_by_a_constant_channel(name: str) -> None:
    """fold_bn turns each per-position compensation term into one more input channel of its conv
    (fed by one more output channel of the conv before it): no hook left, the same outputs."""
    model = built(name, pruned=True)
    carried = fold_bn(model)
    kept = fold_bn(model, carry_maps=False)
    hooked = [n for n, m in kept.named_modules() if response_of(m) is not None and response_of(m).kernel.numel()]
    assert hooked and not any(response_of(m) is not None for m in carried.modules())
    for layer in hooked:  # one more input channel each
        assert carried.get_submodule(layer).in_channels == kept.get_submodule(layer).in_channels + 1
    for size in MODELS[name][2]:
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        assert rel_err(outputs(carried, x), outputs(model, x)) < 1e-5


class TwoReaders(nn.Module):
    """One conv's output read by two padded convs: no single producer can carry either term."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.a, self.b = nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.stem(x)))
        return (self.a(y) + self.b(y)).mean((2, 3))


def test_a_term_with_no_sole_producer_keeps_its_hook_and_stays_exact() -> None:
    model = randomize_bn(TwoReaders()).eval()
    with torch.no_grad():
        model.bn.weight[:4] = 1e-4  # four channels with γ ≈ 0 and β kept
        model.bn.bias += 0.5
    model.arch_spec = {"arch": None, "input_size": (3, 12, 12)}
    pruned = prune_model(model, 0.5).model.eval()
    folded = fold_bn(pruned)
    assert response_of(folded.a) is not None and response_of(folded.a).kernel.numel()
    assert folded.a.in_channels == pruned.a.in_channels
    for size in (12, 15):
        x = torch.randn(2, 3, size, size)
        assert rel_err(outputs(folded, x), outputs(pruned, x)) < 1e-5
