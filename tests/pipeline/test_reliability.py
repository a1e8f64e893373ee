"""Runs that survive: resume, interruption, divergence, corruption — each with exit codes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import DEMO_CONFIG, ROOT, TINY, run, sets
from slimctl.io.checkpoint import load_checkpoint
from slimctl.train import graceful_stop

# 480 digits in fp32 on the CPU: 15 steps an epoch, about 0.7 s with its evaluation and checkpoints.
BASE = sets(*TINY, "data.subset=480", "train.epochs=3")


def same_tensors(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *BASE)
    return out


def test_resume_after_a_crash_is_bit_identical(tmp_path, monkeypatch, uninterrupted):
    out = tmp_path / "run"
    import slimctl.train.loop as train  # where fit looks up evaluate

    real_evaluate, calls = train.evaluate, {"n": 0}

    def crash_in_epoch_two(*args, **kwargs):  # the process dies before epoch 2 is saved (kill -9)
        calls["n"] += 1
        if calls["n"] == 2:
            raise SystemExit(137)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", crash_in_epoch_two)
    run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *BASE, code=137)
    monkeypatch.setattr(train, "evaluate", real_evaluate)
    assert load_checkpoint(out / "last.pt")["resume"]["epoch"] == 1
    run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *BASE, "--resume")
    resumed, reference = load_checkpoint(out / "last.pt"), load_checkpoint(uninterrupted / "last.pt")
    assert same_tensors(resumed["state_dict"], reference["state_dict"])
    assert resumed["resume"]["best_top1"] == reference["resume"]["best_top1"]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(l) for l in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_top1"] for r in rows] == [r["test_top1"] for r in ref_rows]


def _start(out, *extra):
    cmd = [sys.executable, "-m", "slimctl", "sparse-train", "-c", str(DEMO_CONFIG), "-o", str(out), *BASE, *extra]
    # Bit-identity needs the same float reduction order: the same thread count as this process.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    # SIGINT handled as in a terminal even when this suite runs as a background job (which starts
    # with SIGINT ignored, and slimctl leaves an ignored signal ignored).
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(path, proc, timeout=60):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "run did not reach the expected point"
        time.sleep(0.02)


# Enough epochs that the signal, sent within 20 ms of epoch 1's metrics, lands inside the run even on
# a loaded machine (4 epochs, about 3 s, left).
LONG = sets("train.epochs=5")


@pytest.fixture(scope="module")
def uninterrupted_long(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref_long") / "run"
    run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *BASE, *LONG)
    return out


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_at_a_step_with_a_resumable_checkpoint(tmp_path, uninterrupted_long, sig, code):
    out = tmp_path / "run"
    proc = _start(out, *LONG)
    _wait_for(out / "metrics.jsonl", proc)  # epoch 1 finished; the signal lands inside epoch 2
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    last = load_checkpoint(out / "last.pt")
    assert last["resume"]["epoch"] >= 1
    # Resuming (mid-epoch included) ends bit-identical to the uninterrupted run.
    run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *BASE, *LONG, "--resume")
    assert same_tensors(load_checkpoint(out / "last.pt")["state_dict"],
                        load_checkpoint(uninterrupted_long / "last.pt")["state_dict"])


@pytest.fixture
def sigint_default():
    """SIGINT as in an interactive Python (a background job of a script starts with it ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_second_signal_aborts_at_once(sigint_default):
    with graceful_stop() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag["signum"] == signal.SIGINT  # the first one only asks to stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_an_ignored_signal_stays_ignored(sigint_default):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with graceful_stop() as flag:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)
        assert flag["signum"] is None
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_keyboard_interrupt_exits_130_without_traceback(monkeypatch, tmp_path):
    def abort(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("slimctl.pipeline.training.sparse_train", abort)
    result = run("sparse-train", "-c", DEMO_CONFIG, "-o", tmp_path / "x", code=130)
    assert "Aborted" in result.output and "Traceback" not in result.output


def test_resume_refuses_a_different_recipe_or_a_missing_run(tmp_path, uninterrupted):
    result = run("sparse-train", "-c", DEMO_CONFIG, "-o", uninterrupted, *BASE, "--set", "train.lr=0.05",
                 "--resume", code=2)
    assert "train.lr (0.1 → 0.05)" in result.output
    result = run("sparse-train", "-c", DEMO_CONFIG, "-o", tmp_path / "new", *BASE, "--resume", code=2)
    assert "does not exist" in result.output


def test_resume_may_extend_the_schedule(tmp_path, uninterrupted):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *BASE, "--set", "train.epochs=4", "--resume")
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2, 3, 4]


def test_divergence_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    result = run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *BASE, "--set", "train.lr=1e12", code=2)
    assert "diverged" in result.output and "epoch 1, step" in result.output and "lr 1e+12" in result.output
    assert not (out / "best.pt").exists()  # nothing NaN was written


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, uninterrupted):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    before = (out / "last.pt").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.replace", full_disk)
    result = run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *BASE, "--set", "train.epochs=4", "--resume", code=1)
    assert "No space left on device" in result.output
    assert "Traceback" not in result.output
    assert (out / "last.pt").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_live_run_holds_its_folder_and_a_killed_ones_lock_is_taken_over(tmp_path):
    from slimctl.pipeline.runs import hold_run_dir

    out = tmp_path / "run"
    out.mkdir()
    release = hold_run_dir(out)  # as a live run would
    for extra in ((), ("--force",)):
        result = run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *sets(*TINY), *extra, code=2)
        assert "is in use by another run (pid" in result.output
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written beside it
    release()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from slimctl.pipeline.runs import "
                               "hold_run_dir; hold_run_dir(__import__('pathlib').Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(60)", str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *sets(*TINY), code=2)
    holder.kill()
    holder.wait()
    run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *sets(*TINY))  # the dead holder's lock is free
    assert (out / "best.pt").exists() and not (out / ".lock").exists()  # removed when the run ends


def test_a_resumed_run_removes_what_a_killed_save_left_half_written(tmp_path, uninterrupted):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    (out / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # SIGKILL inside atomic_write_bytes
    run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *BASE, "--set", "train.epochs=4", "--resume")
    assert not list(out.glob(".*.tmp"))
