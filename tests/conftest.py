"""Shared fixtures and helpers: tiny models and tiny runs, CPU only.

Helpers used by several test files live here, once:
- `randomize_bn`: random γ, β and running statistics, so every channel matters and differs;
- `strongly_sparse`: that, then γ ≈ 0 on a fraction of each BN's channels (what sparse training does);
- `masked_reference` (over `removed_channels` + `zero_channels`): the original model with γ (and by
  default β) zeroed at every removed channel, which is what a pruned model must compute
  (docs/design.md, "Channel groups");
- `rel_err`: the relative error used to compare outputs;
- `run` and `sets`: a CLI invocation through click's CliRunner with its exit code checked, and the
  `--set key=value` arguments for a list of overrides.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn

if TYPE_CHECKING:
    from click.testing import Result

    from slimctl.core.plan import ChannelPlan

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"

# A seconds-long version of the demo: few samples, one epoch, fp32 for exact comparisons.
TINY = (
    "train.epochs=1",
    "finetune.epochs=1",
    "data.subset=96",
    "data.batch_size=32",
    "train.precision=fp32",
    "train.device=cpu",
)


# --- models ----------------------------------------------------------------------------------------


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every BN's γ ~ U(0, 1), β ~ N(0, 0.1), running mean ~ N(0, 0.1), running var ~ U(0.5, 1.5).

    In place (dtype and device kept); the model's train/eval mode is left as it is.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen))
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model


def strongly_sparse(model: nn.Module, fraction: float = 0.5, seed: int = 0) -> nn.Module:
    """Random BN state, then γ ≈ 0 on `fraction` of each BN's channels (what sparse training does)
    while β stays: the removed channels emit a constant that matters."""
    randomize_bn(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            small = torch.rand(m.num_features, generator=g) < fraction
            m.weight.data[small] = 1e-4 * torch.rand(int(small.sum()), generator=g)
            m.bias.data += 0.5  # biases that survive a ReLU
    return model.eval()


def removed_channels(
    model: nn.Module, plan: ChannelPlan, *, only: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """BN name → the positions, in that BN's own channels in `model`, that `plan` removes.

    Every ranked BN of a group is listed (a depthwise chain or a coupled set has several; a
    concatenated space, each BN reading it, at its offset there). A selection group lists its
    ranking BN only, at the positions of the BN's full width named by the selection's indices (the
    BN itself never shrinks). `only` maps a group's BN to the one BN of that group to list instead
    (sensitivity tests: zeroing one member of a coupled set must differ).
    """
    removed: dict[str, torch.Tensor] = {}
    for gp in plan.groups:
        gone = torch.ones(gp.total, dtype=torch.bool)
        gone[gp.keep.cpu()] = False
        positions = gone.nonzero().flatten()
        at = [(name, 0) for name in gp.group.bns] + [(name, offset) for name, offset, _ in gp.group.slices]
        if gp.group.selection is not None:  # group positions → the BN's full width
            positions = model.get_submodule(gp.group.selection).indices.cpu()[positions]
            at = [(gp.group.bn, 0)]
        if only is not None and gp.group.bn in only:
            at = [next(entry for entry in at if entry[0] == only[gp.group.bn])]
        for name, offset in at:
            removed[name] = torch.cat([removed[name], positions + offset]) if name in removed else positions + offset
    return removed


def zero_channels(model: nn.Module, removed: dict[str, torch.Tensor], *, zero_beta: bool = True) -> nn.Module:
    """A copy of `model`, in eval mode, with γ (and β unless `zero_beta=False`) zeroed at `removed`."""
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, positions in removed.items():
            bn = ref.get_submodule(name)
            bn.weight[positions] = 0
            if zero_beta:
                bn.bias[positions] = 0
    return ref


def masked_reference(
    model: nn.Module, plan: ChannelPlan, *, zero_beta: bool = True, only: dict[str, str] | None = None
) -> nn.Module:
    """The original, in eval mode, with γ and β zeroed at every channel `plan` removes.

    A model pruned by literal removal (`compensate="none"`) computes exactly this in eval mode
    (docs/design.md, "Channel groups"). `zero_beta=False` zeroes γ only and keeps β: the reference
    for a removal that carries the removed channels' constant β response into their consumers.
    `only`: see `removed_channels`.
    """
    return zero_channels(model, removed_channels(model, plan, only=only), zero_beta=zero_beta)


def use_clock(monkeypatch, clock) -> None:
    """Time every model prune measures with `clock(model, target)` → ms (a noiseless stand-in for the
    deployed latency: the search, the speed check and the widths' whole-model timings all read it)."""
    from slimctl.pipeline import latency

    monkeypatch.setattr(latency, "latency_clock", lambda model, target: lambda: clock(model, target))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| relative to max |b|."""
    return float((a - b).abs().max() / b.abs().max())


# --- CLI -------------------------------------------------------------------------------------------


def run(*args, code: int | None = 0) -> Result:
    """`slimctl ARGS` through click's CliRunner (arguments str()-ed); asserts the exit code unless None."""
    from click.testing import CliRunner

    from slimctl.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    if code is not None:
        assert result.exit_code == code, result.output + repr(result.exception)
    return result


def sets(*items: str) -> list[str]:
    """`--set` arguments for config overrides: sets("a=1", "b=2") → ["--set", "a=1", "--set", "b=2"]."""
    return [arg for item in items for arg in ("--set", item)]


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def sparse_checkpoint(tmp_path) -> Path:
    """A VGG-11 ×0.25 with half of each BN's γ near zero (`strongly_sparse`), saved as a sparse-train
    checkpoint: something to prune without training."""
    import slimctl

    torch.manual_seed(0)
    path = tmp_path / "sparse.pt"
    slimctl.save_model(strongly_sparse(slimctl.create_model("vgg11", 10, width=0.25)), path, stage="sparse-train")
    return path


@pytest.fixture
def tiny_overrides() -> tuple[str, ...]:
    return TINY


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One tiny sparse-trained demo run (the TINY settings, through the CLI), made once per test
    process for every test that needs *a* trained checkpoint: its folder, with best.pt, last.pt,
    config.yaml, metrics.jsonl and train.log (the command's output). Read-only, so a test that would
    write beside it fails rather than change what the others read: write into your own tmp_path."""
    out = tmp_path_factory.mktemp("tiny_run") / "sparse"
    result = run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *sets(*TINY))
    (out / "train.log").write_text(result.output)
    for path in (*out.iterdir(), out):
        path.chmod(0o555 if path.is_dir() else 0o444)
    return out


@pytest.fixture
def one_thread():
    """Many small ops: one thread is faster than fighting other work for 2 cores (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Bottleneck(nn.Module):
    """ResNeXt's block: 1×1 → 3×3 with 4 groups of 3 → 1×1, a residual around it (kept: coupled)."""

    def __init__(self, groups: int = 4, per: int = 3, in_c: int = 8) -> None:
        super().__init__()
        width = groups * per
        self.stem, self.bn0 = nn.Conv2d(3, in_c, 3, padding=1, bias=False), nn.BatchNorm2d(in_c)
        self.a, self.bn_a = nn.Conv2d(in_c, width, 1, bias=False), nn.BatchNorm2d(width)
        self.b, self.bn_b = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(width)
        self.c, self.bn_c = nn.Conv2d(width, in_c, 1, bias=False), nn.BatchNorm2d(in_c)
        self.head = nn.Linear(in_c, 5)
        self.arch_spec = {"arch": None, "num_classes": 5, "arch_args": {}, "input_size": [3, 8, 8]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn_a(self.a(x)))
        y = torch.relu(self.bn_b(self.b(y)))
        x = torch.relu(x + self.bn_c(self.c(y)))
        return self.head(x.mean((2, 3)))


def grouped_bottleneck(seed: int = 0) -> nn.Module:
    """A `Bottleneck` in float64 with random γ and β (removed channels emit constants that are not 0)."""
    torch.manual_seed(seed)
    model = Bottleneck().double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0, 1)
            m.bias.data.uniform_(-0.5, 0.5)  # removed channels emit constants that are not 0
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()
