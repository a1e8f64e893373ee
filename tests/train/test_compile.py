"""The training step: compiled vs eager, the fallback when compiling fails, and no host syncs."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from slimctl.data import ImageSet, TensorLoader
from slimctl.base.device import COMPILE_MODES, compile_mode
from slimctl.errors import SlimctlError
from slimctl.core.sparsity import SparsityTerm, bn_scales
from slimctl.train import TrainStep, train_one_epoch

from conftest import DEMO_CONFIG, TINY, run, sets

CPU = torch.device("cpu")


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )


def stepper(model: nn.Module, *, mode: str | None, momentum: float = 0.0, warn=print,
            regularizer: str = "l1") -> TrainStep:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=1e-4)
    gammas = bn_scales(model, ["1", "4"])
    # λ large enough that a wrong or missing sign step would show above float noise.
    term = SparsityTerm(1e-2, regularizer, 1.2 if regularizer == "polarization" else 1.0)
    return TrainStep(model, optimizer, gammas=gammas, sparsity=term, device=CPU, dtype=None, mode=mode, warn=warn)


def batches(sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)) for n in sizes]


# --------------------------------------------------------------------------- modes


def test_compile_setting_maps_to_a_torch_compile_mode():
    assert compile_mode(False) is None
    assert compile_mode(True) == "default"
    assert all(compile_mode(m) == m for m in COMPILE_MODES)
    with pytest.raises(SlimctlError, match="unknown compile mode 'fastest'"):
        compile_mode("fastest")


@pytest.mark.parametrize("value", ["fastest", "1.5", "[1]"])
def test_an_unknown_compile_mode_is_exit_2_before_any_training(tmp_path, value):
    out = tmp_path / "run"
    result = run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *sets(*TINY, f"train.compile={value}"), code=2)
    assert "train.compile" in result.output and "Traceback" not in result.output
    assert not out.exists()


# --------------------------------------------------------------------------- compiled == eager


@pytest.mark.slow
def test_a_compiled_step_trains_like_the_eager_one_and_the_last_partial_batch_does_not_recompile(one_thread):
    """Inductor on the CPU (≈ 1 min of compiling on 2 cores): the γ update, λ·sign(γ) included, and
    every other parameter match the eager step within float noise."""
    torch._dynamo.reset()
    eager_model, compiled_model = small_net(), small_net()
    eager, compiled = stepper(eager_model, mode=None), stepper(compiled_model, mode="default")
    data = batches([16, 16, 16, 5])  # a last partial batch, as an epoch of 53 samples has
    with torch._dynamo.config.patch(error_on_recompile=True):  # a second graph for the 5 would fail here
        for x, y in data:
            loss_e, _ = eager(x, y)
            loss_c, _ = compiled(x, y)
            assert torch.allclose(loss_e, loss_c, rtol=1e-4, atol=1e-5)
    assert compiled.compiled_forward is not None, "the compiled step fell back to eager"
    for (name, pe), (_, pc) in zip(eager_model.named_parameters(), compiled_model.named_parameters()):
        assert torch.allclose(pe, pc, rtol=1e-4, atol=1e-5), name
    start = small_net()
    moved = (compiled_model[1].weight - start[1].weight).abs().max()
    assert moved > 1e-3  # it trained


# --------------------------------------------------------------------------- fallback


class Exploding:
    """Stands in for a compiled callable whose (lazy) compilation fails at the first call."""

    def __init__(self, error: Exception) -> None:
        self.error, self.calls = error, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        raise self.error


def test_a_compile_failure_warns_once_redoes_the_step_eagerly_and_continues_eager(monkeypatch):
    fake = Exploding(RuntimeError("backend exploded\nlong details"))
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fake)
    warnings: list[str] = []
    compiled_model, eager_model = small_net(), small_net()
    compiled = stepper(compiled_model, mode="default", warn=warnings.append)
    eager = stepper(eager_model, mode=None)
    for x, y in batches([16, 16, 16]):
        compiled(x, y)
        eager(x, y)
    assert fake.calls == 1  # tried once, then eager for good
    assert len(warnings) == 1 and "train.compile 'default' failed (RuntimeError: backend exploded)" in warnings[0]
    for pe, pc in zip(eager_model.parameters(), compiled_model.parameters()):
        assert torch.equal(pe, pc)  # the failed step was redone, not lost or doubled


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1000000 bytes"),
])
def test_out_of_memory_in_a_compiled_step_is_not_taken_for_a_compile_failure(monkeypatch, error):
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: Exploding(error))
    warnings: list[str] = []
    step = stepper(small_net(), mode="default", warn=warnings.append)
    (x, y), = batches([4])
    with pytest.raises(type(error)):
        step(x, y)
    assert warnings == []


def test_fit_compiles_the_step_with_the_configured_mode(monkeypatch, tmp_path):
    """`train.compile` reaches torch.compile through fit (a pass-through stands in for inductor)."""
    modes: list[tuple[str, str]] = []

    def passthrough(fn=None, **kwargs):
        if isinstance(fn, nn.Module) or getattr(fn, "__name__", "") == "update":  # torch compiles its own too
            modes.append((type(fn).__name__, kwargs.get("mode")))
        return fn

    monkeypatch.setattr(torch, "compile", passthrough)
    out = tmp_path / "run"
    run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *sets(*TINY, "train.compile=reduce-overhead"))
    # The model's graph in the configured mode; the update's (optimizer foreach kernels) in the default.
    assert modes == [("VGG", "reduce-overhead"), ("method", None)]


# --------------------------------------------------------------------------- host syncs


SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts every Tensor method that copies a value to the host (a device sync on a GPU)."""
    counts = {"n": 0}
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def tiny_loader(samples: int) -> TensorLoader:
    gen = torch.Generator().manual_seed(0)
    data = ImageSet(images=torch.randint(0, 256, (samples, 3, 8, 8), dtype=torch.uint8, generator=gen),
                    labels=torch.randint(0, 10, (samples,), generator=gen), num_classes=10,
                    mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), flip=True)
    return TensorLoader(data, batch_size=8, train=True, pad=2)


@pytest.mark.parametrize("regularizer", ["l1", "polarization"])  # polarization's γ mean stays on the device
def test_the_step_loop_reads_the_device_once_per_epoch_not_once_per_step(host_reads, regularizer):
    def epoch_reads(samples: int) -> int:
        model = small_net()
        step = stepper(model, mode=None, regularizer=regularizer)
        loader = tiny_loader(samples)
        host_reads["n"] = 0
        state = train_one_epoch(step, loader, on_step=lambda n, loss: None)
        assert state.steps == len(loader)
        return host_reads["n"]

    short, long = epoch_reads(16), epoch_reads(96)  # 2 steps vs 12 steps
    assert short == long, f"{long - short} host reads per 10 extra steps"
    assert long <= 3  # loss sum, correct count, first bad step: once each, at the end
