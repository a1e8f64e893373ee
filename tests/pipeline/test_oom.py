"""Out of memory, CPU or CUDA: one line and exit 2, never a traceback, never a lost checkpoint."""

import functools
import json
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import DEMO_CONFIG, ROOT, TINY, run, sets
from slimctl import models
from slimctl.base import registry
from slimctl.io.checkpoint import load_checkpoint
from slimctl.errors import SlimctlError, allocation_detail, is_out_of_memory, out_of_memory_as_error
from slimctl.base.files import file_sha256
from slimctl.models import create_model, list_models

# What DefaultCPUAllocator says (torch 2.x) when malloc fails: 137.33 GiB here.
CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
           "you tried to allocate 147456000000 bytes. Error code 12 (Cannot allocate memory)")
CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which "
            "1.56 GiB is free. Including non-PyTorch memory, this process has 77.58 GiB memory in use.")


# --- is_out_of_memory, out_of_memory_as_error ------------------------------------------------------


@pytest.mark.parametrize("exc", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    torch.cuda.OutOfMemoryError("x"),
    type("OutOfMemoryError", (RuntimeError,), {})("a look-alike from another backend"),
    RuntimeError(CPU_OOM),
    RuntimeError("MPS backend out of memory (MPS allocated: 1.00 GiB)"),
    MemoryError(),
])
def test_out_of_memory_is_recognised(exc):
    assert is_out_of_memory(exc)


@pytest.mark.parametrize("exc", [
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"),
    ValueError("out of memory"),  # only RuntimeErrors are read for the allocator's words
    KeyError("memory"),
])
def test_other_errors_are_not_out_of_memory(exc):
    assert not is_out_of_memory(exc)


def test_other_errors_pass_through_unchanged():
    err = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError) as caught:
        with out_of_memory_as_error("doing x", "y"):
            raise err
    assert caught.value is err


@pytest.mark.parametrize("exc, detail", [
    (torch.OutOfMemoryError(CUDA_OOM), "tried to allocate 2.00 GiB (GPU 0: 1.56 GiB free of 79.15 GiB)"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "tried to allocate 2.00 GiB"),
    (RuntimeError(CPU_OOM), "tried to allocate 137.33 GiB"),
    (RuntimeError("MPS backend out of memory (MPS allocated: 1.00 GiB)\nmore"),
     "MPS backend out of memory (MPS allocated: 1.00 GiB)"),  # no size to parse: the first line
    (MemoryError(), "MemoryError"),
])
def test_out_of_memory_becomes_one_line(exc, detail):
    with pytest.raises(SlimctlError) as caught:
        with out_of_memory_as_error("doing x", "y or z"):
            raise exc
    assert str(caught.value) == f"out of memory while doing x: {detail}; lower y or z"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # `from None`: no chained traceback
    assert allocation_detail(exc) == detail


def test_a_real_cpu_allocation_failure_is_converted():
    with pytest.raises(SlimctlError, match=r"^out of memory while allocating: tried to allocate 4\.00 EiB; lower n$"):
        with out_of_memory_as_error("allocating", "n"):
            torch.empty(2**62, dtype=torch.uint8)  # 4 EiB: past any address space, fails at once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_real_cuda_allocation_failure_is_converted():
    with pytest.raises(SlimctlError) as caught:
        with out_of_memory_as_error("allocating on cuda", "n"):
            torch.empty(2**50, dtype=torch.uint8, device="cuda")  # 1 PiB: cudaMalloc refuses at once
    message = str(caught.value)
    assert message.startswith("out of memory while allocating on cuda: tried to allocate "), message
    assert message.endswith("; lower n") and "\n" not in message, message


# --- building a model ------------------------------------------------------------------------------


def test_info_with_an_absurd_width_is_one_line_and_exit_2():
    done = subprocess.run([sys.executable, "-m", "slimctl", "info", "--arch", "vgg19", "--width", "1e6"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert done.stderr.startswith("Error: out of memory while building vgg19 at width 1e+06: ")
    assert done.stderr.strip().endswith("; lower model.width / --width")


@pytest.mark.parametrize("width, detail", [
    ("1000", r"\(≈ 2e\+13 parameters\): its parameters alone need 72\.82 TiB but this machine has"),
    ("inf", "more than 8 EiB"),
])
def test_info_refuses_before_allocating(width, detail):
    result = run("info", "--arch", "vgg19", "--width", width, code=2)
    assert "Traceback" not in result.output
    assert result.output.startswith(f"Error: out of memory while building vgg19 at width {width}")
    assert result.output.strip().count("\n") == 0, result.output
    assert re.search(detail, result.output), result.output


def test_sparse_train_with_an_absurd_width_leaves_the_run_folder_alone(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    before = {}
    for name in ("last.pt", "best.pt", "config.yaml", "metrics.jsonl"):  # another run's files
        (out / name).write_bytes(name.encode() * 100)
        before[name] = file_sha256(out / name)
    result = run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *sets(*TINY, "model.width=1000"), "--force", code=2)
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith(
        "Error: out of memory while building vgg11 at width 1000 (≈ 9.22e+12 parameters): its parameters alone need"
    )
    assert result.output.strip().endswith("; lower model.width / --width")
    assert {p.name: file_sha256(p) for p in out.iterdir()} == before
    fresh = tmp_path / "fresh"
    run("sparse-train", "-c", DEMO_CONFIG, "-o", fresh, *sets(*TINY, "model.width=1000"), code=2)
    assert not fresh.exists()  # a refused run leaves no empty folder behind


def test_refused_when_parameters_exceed_physical_memory(monkeypatch):
    monkeypatch.setattr(models, "physical_memory", lambda: 1 << 20)  # a 1 MiB machine
    expected = (r"^out of memory while building vgg11 at width 1\.5 \(≈ 2\.08e\+07 parameters\): its parameters "
                r"alone need 79\.\d\d MiB but this machine has 1\.00 MiB; lower model\.width / --width$")
    with pytest.raises(SlimctlError, match=expected):
        create_model("vgg11", 10, width=1.5)
    with pytest.raises(SlimctlError, match=r"preresnet at width 1 \(≈ 5\.9e\+05 parameters\): .* 2\.\d\d MiB"):
        create_model("preresnet", 10, depth=56)  # a depth given: counted too
    create_model("vgg11", 10)  # 35 MiB: at width 1 and default depth no family is counted (nor too large)


@pytest.mark.parametrize("width, counted", [(1.0, ""), (2.0, " (≈ 50 parameters)")])
def test_allocation_failure_while_building_is_converted(monkeypatch, width, counted):
    def oomnet(num_classes: int, width: float = 1.0) -> nn.Module:  # fits on "meta"; the real build fails
        model = nn.Linear(4, num_classes)
        if not model.weight.is_meta:
            raise RuntimeError(CPU_OOM)
        return model

    monkeypatch.setitem(registry._REGISTRY, "oomnet", oomnet)
    with pytest.raises(SlimctlError) as caught:
        create_model("oomnet", 10, width=width)
    assert str(caught.value) == (f"out of memory while building oomnet at width {width:g}{counted}: "
                                 "tried to allocate 137.33 GiB; lower model.width / --width")


@pytest.mark.parametrize("arch", list_models())
def test_the_meta_precheck_leaves_models_and_random_state_unchanged(arch):
    # The pre-check builds the family once on "meta": nothing real allocated, no random number drawn.
    build = functools.partial(registry.builder(arch), num_classes=10, width=0.25)
    torch.manual_seed(0)
    assert models.check_fits_in_memory(build, "building", "n").startswith("building (≈ ")
    checked = build().state_dict()
    after_checked = torch.get_rng_state()
    torch.manual_seed(0)
    direct = build().state_dict()
    assert torch.equal(after_checked, torch.get_rng_state())
    assert checked.keys() == direct.keys() and all(torch.equal(checked[k], direct[k]) for k in direct)
    with torch.device("meta"):
        on_meta = build()
    assert all(t.is_meta for t in [*on_meta.parameters(), *on_meta.buffers()])


# --- a training step -------------------------------------------------------------------------------


@pytest.mark.parametrize("exc, detail", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "tried to allocate 2.00 GiB"),
    (RuntimeError(CPU_OOM), "tried to allocate 137.33 GiB"),
])
def test_out_of_memory_in_epoch_two_keeps_epoch_one_checkpoint(tmp_path, monkeypatch, one_thread, exc, detail):
    import slimctl.train.loop as train  # where fit looks these up

    out, real_epoch, real_save_epoch = tmp_path / "run", train.train_one_epoch, train.save_epoch
    saved = []  # last.pt's sha256 after each epoch's save

    def fail_in_epoch_two(*args, **kwargs):
        if saved:  # epoch 1 is done and saved
            raise exc
        return real_epoch(*args, **kwargs)

    def save_epoch(*args, **kwargs):
        real_save_epoch(*args, **kwargs)
        saved.append(file_sha256(out / "last.pt"))

    monkeypatch.setattr(train, "train_one_epoch", fail_in_epoch_two)
    monkeypatch.setattr(train, "save_epoch", save_epoch)
    result = run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *sets(*TINY, "train.epochs=2"), code=2)
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (
        f"Error: out of memory while training vgg11 (batch size 32): {detail}; lower data.batch_size or model.width"
    )
    assert saved and file_sha256(out / "last.pt") == saved[-1]
    assert load_checkpoint(out / "last.pt")["resume"]["epoch"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.jsonl"]


# --------------------------------------------------------------------------- evaluation: eval, sweep, prune


@pytest.fixture
def tiny_checkpoint(tiny_run):
    return tiny_run / "best.pt"


@pytest.mark.parametrize("command", [["eval"], ["sweep", "--ratios", "0.5"], ["prune", "--ratio", "0.5"]])
def test_out_of_memory_while_evaluating_names_the_test_batch(tmp_path, monkeypatch, tiny_checkpoint, command):
    import slimctl.pipeline.pruning as pruning

    def no_memory(*args, **kwargs):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(pruning, "evaluate", no_memory)
    out = tmp_path / "pruned.pt"
    extra = ["-o", out] if command[0] == "prune" else []
    result = run(command[0], tiny_checkpoint, *command[1:], *extra, "--batch-size", "7", code=2)
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: out of memory while evaluating on the digits test set (batch size 7): "
        "tried to allocate 137.33 GiB; lower --batch-size")
    assert not out.exists()  # prune evaluates before it writes


def test_the_test_batch_changes_batches_not_the_score(tiny_checkpoint):
    default = json.loads(run("eval", tiny_checkpoint, "--json").output)
    small = json.loads(run("eval", tiny_checkpoint, "--batch-size", "7", "--json").output)
    assert small["top1"] == pytest.approx(default["top1"]) and small["loss"] == pytest.approx(default["loss"], rel=1e-4)
    assert "--batch-size" in run("eval", tiny_checkpoint, "--batch-size", "0", code=2).output
