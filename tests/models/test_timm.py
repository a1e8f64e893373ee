"""timm models through the tracer, surgery, checkpoints and CLI (`model.arch: timm.<name>`).

Most timm CNNs normalise with `BatchNormAct2d`, a BatchNorm2d subclass that applies its activation
(and drop) inside the module: the tracer ranks it as a BN and judges its activation like a separate
one. Same invariant as the torchvision tests (tests/trace/test_trace.py): with literal removal the pruned
model equals the original with the removed channels' γ and β zeroed; with the default β
compensation it equals the original with only γ zeroed wherever every consumer could be
compensated (the others are named in the notes).
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from torch import nn

from conftest import masked_reference, randomize_bn, rel_err, run
from slimctl import load_model, make_checkpoint, save_checkpoint
from slimctl.errors import SlimctlError
from slimctl.models import create_model
from slimctl.models.layers import module_widths
from slimctl.core.plan import make_plan
from slimctl.pipeline.training import load_pretrained
from slimctl.core.surgery import apply_plan, apply_plan_with_notes, applied_plan
from slimctl.trace import derive_groups

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

# name → (input size, coupled mode). The first block: families that normalise with BatchNormAct2d
# (refused before this tracer understood it); the second: families that passed already.
MODELS = {
    "tinynet_e": (64, "keep"),  # TinyNet / EfficientNet
    "efficientnet_b0": (64, "keep"),
    "tf_mobilenetv3_small_minimal_100": (64, "keep"),  # MobileNetV3, TF 'same' padding (Conv2dSame)
    "mobilenetv3_small_050": (64, "keep"),
    "regnety_002": (64, "keep"),
    "dpn48b": (64, "keep"),
    "cs3darknet_s": (64, "keep"),  # CSPNet
    "mixnet_s": (64, "keep"),
    "densenet121": (64, "keep"),
    "ese_vovnet19b_slim_dw": (64, "keep"),  # VoVNet / ESE
    "lcnet_035": (64, "keep"),
    "repvgg_a0": (64, "max"),  # every space residual-coupled: prunes only with --coupled
    "inception_v3": (80, "keep"),  # needs ≥ 75×75
    "resnet32ts": (64, "keep"),  # ResNet-ts (ByobNet)
    "resnet18": (64, "keep"),
    "ghostnet_050": (64, "keep"),
    "dla46_c": (64, "keep"),
}


def image(size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def timm_model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


@torch.no_grad()
def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


def traced_plan(model: nn.Module, x: torch.Tensor, coupled: str = "keep", ratio: float = 0.5):
    result = derive_groups(model, x, coupled=coupled)
    result.prepare(model)
    randomize_bn(model).eval()
    return result, make_plan(model, result.groups, ratio)


@pytest.mark.parametrize("name", list(MODELS))
def test_timm_pruned_equals_masked_original(name: str) -> None:
    size, coupled = MODELS[name]
    model, x = timm_model(name), image(size)
    result, plan = traced_plan(model, x, coupled)
    assert plan.kept < plan.total
    assert all(s.reason for s in result.spaces if s.kind == "frozen")
    out_orig = outputs(model, x)
    # Literal removal: the original with γ and β zeroed.
    literal = apply_plan(model, plan, compensate="none")
    ref = masked_reference(model, plan)
    assert rel_err(outputs(literal, x), outputs(ref, x)) < 1e-5
    assert rel_err(outputs(ref, x), out_orig) > 1e-3  # otherwise the comparison above could not fail
    # β compensation (the default): the original with only γ zeroed, for the plan applied (a group
    # whose removed channels some consumer cannot be compensated for is kept whole, and named).
    exact, notes, applied = applied_plan(model, plan, compensate="exact")
    assert rel_err(outputs(exact, x), outputs(masked_reference(model, applied, zero_beta=False), x)) < 1e-5
    assert all("cannot be compensated" in n and "kept" in n for n in notes)
    assert (applied.kept > plan.kept) is bool(notes)
    # The pruned model trains.
    literal.train()
    literal(x).square().mean().backward()


def test_batchnorm_act_is_ranked_and_keeps_its_activation_after_surgery() -> None:
    model, x = timm_model("mobilenetv3_small_050"), image()
    bn = model.blocks[1][0].bn1
    assert isinstance(bn, timm.layers.BatchNormAct2d) and not isinstance(bn.act, nn.Identity)
    result, plan = traced_plan(model, x)
    assert "blocks.1.0.bn1" in {b for g in result.groups for b in g.bns}
    pruned = apply_plan(model, plan)
    new = pruned.blocks[1][0].bn1
    assert type(new) is type(bn) and type(new.act) is type(bn.act) and new.num_features < bn.num_features
    # A checkpoint's widths rebuild the same modules.
    fresh = create_model("timm.mobilenetv3_small_050", 10, widths=module_widths(pruned), input_size=(3, 64, 64))
    fresh.load_state_dict(pruned.state_dict())
    assert type(fresh.blocks[1][0].bn1.act) is type(bn.act)
    assert torch.equal(outputs(fresh, x), outputs(pruned, x))


def test_conv2d_same_keeps_its_padding_and_is_not_compensated_blindly() -> None:
    model, x = timm_model("tf_mobilenetv3_small_minimal_100"), image()
    result, plan = traced_plan(model, x)
    pruned = apply_plan(model, plan, compensate="none")
    resized = [n for n, m in pruned.named_modules() if type(m).__name__ == "Conv2dSame"
               and m.out_channels < model.get_submodule(n).out_channels]
    assert resized  # depthwise Conv2dSame convs shrank and stayed Conv2dSame
    # A Conv2dSame consumer: its padding is decided at run time (and differs with the input's parity),
    # so its β response is its own forward's: exact at odd and even sizes.
    net = _Net(nn.BatchNorm2d(8))
    net.conv2 = timm.layers.Conv2dSame(8, 16, 3, stride=2, bias=False)
    x = image(15)
    result = derive_groups(net, x)
    result.prepare(net)
    randomize_bn(net)
    with torch.no_grad():
        net.bn1.bias += 0.5  # constants that survive the ReLU
    plan = make_plan(net.eval(), result.groups, 0.5)
    pruned, notes = apply_plan_with_notes(net, plan)
    assert not notes and type(pruned.conv2).__name__ == "Conv2dSame"
    for size in (15, 16):
        reference = masked_reference(net, plan, zero_beta=False)
        assert rel_err(outputs(pruned, image(size)), outputs(reference, image(size))) < 1e-5
    literal = apply_plan(net, plan, compensate="none")
    assert rel_err(outputs(literal, x), outputs(masked_reference(net, plan), x)) < 1e-5


def test_sync_batchnorm_act_prunes_exactly() -> None:
    model = randomize_bn(timm_model("mobilenetv3_small_050"))
    synced = timm.layers.convert_sync_batchnorm(copy.deepcopy(model))  # a checkpoint trained with sync_bn
    assert type(synced.bn1).__name__ == "SyncBatchNormAct"
    x = image()
    result = derive_groups(synced, x)
    result.prepare(synced)
    plan = make_plan(synced.eval(), result.groups, 0.5)
    pruned = apply_plan(synced, plan, compensate="none")
    assert type(pruned.bn1).__name__ == "SyncBatchNormAct"
    assert rel_err(outputs(pruned, x), outputs(masked_reference(synced, plan), x)) < 1e-5


def test_plain_sync_batchnorm_is_ranked() -> None:
    model = nn.SyncBatchNorm.convert_sync_batchnorm(timm_model("resnet18"))
    result = derive_groups(model, image())
    assert "layer1.0.bn1" in {b for g in result.groups for b in g.bns}


class _Net(nn.Module):
    def __init__(self, middle: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), middle
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize(("middle", "why"), [
    (lambda: __import__("torchvision").ops.misc.FrozenBatchNorm2d(8), "frozen"),  # also timm's frozen BN
    (lambda: timm.layers.FrozenBatchNormAct2d(8), "frozen"),
    (lambda: nn.BatchNorm2d(8, affine=False), "affine=False"),
])
def test_frozen_and_affine_free_batchnorms_keep_their_width_with_the_reason(middle, why) -> None:
    model, x = _Net(middle()), image(16)
    result = derive_groups(model, x)
    assert why in result.frozen_bns["bn1"] and "'bn1'" in result.frozen_bns["bn1"]
    frozen = [s for s in result.spaces if s.kind == "frozen" and "'bn1'" in (s.reason or "")]
    assert frozen and all(why in s.reason for s in frozen)
    assert "bn1" not in {b for g in result.groups for b in g.bns}
    # The other BNs still prune exactly.
    result.prepare(model)
    for bn in (model.bn2, model.bn3):
        randomize_bn(bn)
    plan = make_plan(model.eval(), result.groups, 0.5)
    assert plan.kept < plan.total
    literal = apply_plan(model, plan, compensate="none")
    assert rel_err(outputs(literal, x), outputs(masked_reference(model, plan), x)) < 1e-5


def test_a_model_with_only_frozen_batchnorms_is_refused_naming_one() -> None:
    model = timm.layers.freeze_batch_norm_2d(timm_model("mobilenetv3_small_050"))
    with pytest.raises(SlimctlError, match=r"no trainable BatchNorm2d: FrozenBatchNormAct2d 'bn1' \(frozen"):
        derive_groups(model, image())


def test_untraceable_model_is_refused_naming_the_module() -> None:
    with pytest.raises(SlimctlError, match=r"cannot trace ByobNet: module 'stages\.\d+\.\d+'"):
        derive_groups(timm_model("mobilevitv2_050"), image())


# --- model.arch: timm.<name> -------------------------------------------------------------------


def _checkpoint(tmp_path, arch: str = "timm.mobilenetv3_small_050"):
    torch.manual_seed(0)
    model = randomize_bn(create_model(arch, 10, input_size=(3, 64, 64))).eval()
    path = tmp_path / "model.pt"
    save_checkpoint(path, make_checkpoint(model, stage="sparse-train"))
    return path


def test_cli_round_trip_on_a_timm_checkpoint(tmp_path) -> None:
    path = _checkpoint(tmp_path)
    info = json.loads(run("info", path, "--json").output)
    assert info["arch"] == "timm.mobilenetv3_small_050" and "blocks.1.0.bn1" in info["bn_widths"]
    rows = json.loads(run("groups", path, "--json").output)
    assert {"depthwise", "frozen"} <= {r["kind"] for r in rows}
    first = json.loads(run("prune", path, "--ratio", "0.5", "-o", tmp_path / "p1.pt", "--no-eval", "--json").output)
    assert first["params"] < first["params_before"] and first["flops"] < first["flops_before"]
    pruned = load_model(tmp_path / "p1.pt")
    assert type(pruned.bn1).__name__ == "BatchNormAct2d"
    with torch.no_grad():
        assert pruned(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    second = json.loads(run("prune", tmp_path / "p1.pt", "--ratio", "0.3", "-o", tmp_path / "p2.pt", "--no-eval",
                            "--json").output)
    assert second["params_before"] == first["params"] and second["params"] < first["params"]


def test_info_and_groups_on_a_timm_arch_name() -> None:
    info = json.loads(run("info", "--arch", "timm.lcnet_035", "--json").output)
    assert info["arch"] == "timm.lcnet_035" and info["params"] > 0
    assert "members" in run("groups", "timm.lcnet_035", "--explain").output
    assert "unknown timm model 'nope'" in run("info", "--arch", "timm.nope", code=2).output
    assert "model.width" in run("info", "--arch", "timm.lcnet_035", "--width", "0.5", code=2).output


def test_arch_args_reach_timm_create_model_and_the_checkpoint(tmp_path) -> None:
    model = create_model("timm.resnet18", 7, input_size=(3, 64, 64), drop_rate=0.1)
    assert model.arch_spec["arch_args"]["drop_rate"] == 0.1 and model.fc.out_features == 7
    path = tmp_path / "m.pt"
    save_checkpoint(path, make_checkpoint(model, stage="sparse-train"))
    assert load_model(path).drop_rate == 0.1
    with pytest.raises(SlimctlError, match="timm.resnet18"):
        create_model("timm.resnet18", 7, no_such_argument=1)


def test_missing_timm_names_the_extra(monkeypatch, tmp_path) -> None:
    path = _checkpoint(tmp_path, "timm.lcnet_035")
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(SlimctlError, match=r"pip install 'slimctl\[timm\]'"):
        create_model("timm.resnet18", 10)
    for args in (("info", "--arch", "timm.resnet18"), ("groups", "timm.resnet18"), ("info", path)):
        assert "pip install 'slimctl[timm]'" in run(*args, code=2).output


def test_weights_from_a_local_state_dict_file(tmp_path) -> None:
    source = timm_model("resnet18")  # 10 classes
    file = tmp_path / "weights.pt"
    torch.save(source.state_dict(), file)
    model = create_model("timm.resnet18", 5)
    logs = []
    load_pretrained(model, str(file), log=logs.append)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert "fresh: fc.bias, fc.weight" in logs[0]  # another head size
    with pytest.raises(SlimctlError, match="needs a timm.<name> arch"):
        load_pretrained(create_model("vgg11", 10), "timm")


def test_drop_path_is_a_per_channel_leaf() -> None:
    model, x = timm_model("resnet18", drop_path_rate=0.2), image()
    assert any(type(m).__name__ == "DropPath" for m in model.modules())
    result, plan = traced_plan(model, x, coupled="max")
    assert not any("DropPath" in (s.reason or "") for s in result.spaces)
    literal = apply_plan(model, plan, compensate="none")
    assert rel_err(outputs(literal, x), outputs(masked_reference(model, plan), x)) < 1e-5


def test_fold_keeps_the_activation_of_a_batchnorm_act() -> None:
    from slimctl.core.fold import fold_bn, fold_plan

    model, x = randomize_bn(timm_model("mobilenetv3_small_050")).eval(), image()
    assert ("conv_stem", "bn1") in fold_plan(model, x).folds
    folded = fold_bn(model, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert rel_err(outputs(folded, x), outputs(model, x)) < 1e-5
