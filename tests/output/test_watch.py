"""Watching a run: plain progress lines, TensorBoard events, `compare`, and the recorded machine."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml

from slimctl.base.device import environment, machine_label
from slimctl.errors import SlimctlError
from slimctl.output.progress import Every, LineProgress, RunClock, duration, parse_every

from conftest import DEMO_CONFIG, TINY, run, sets


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- progress lines


@pytest.mark.parametrize("text, parsed", [("50", Every(steps=50)), ("30s", Every(seconds=30.0)),
                                          (" 2.5S ", Every(seconds=2.5)), ("5%", Every(fraction=0.05)),
                                          ("100%", Every(fraction=1.0))])
def test_log_every_takes_steps_seconds_or_a_share_of_an_epoch(text, parsed):
    assert parse_every(text) == parsed


@pytest.mark.parametrize("text", ["0", "-3", "abc", "5m", "0s", "", "0%", "150%", "x%"])
def test_a_bad_log_every_is_refused(text):
    with pytest.raises(SlimctlError, match="--log-every expects"):
        parse_every(text)


def test_a_bad_log_every_is_exit_2_before_the_run_folder_exists(tmp_path):
    out = tmp_path / "run"
    result = run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *sets(*TINY), "--log-every", "often", code=2)
    assert "--log-every expects" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_the_run_clock_projects_the_epoch_and_the_run():
    clock = FakeClock()
    run_clock = RunClock(clock)
    clock.now += 50  # model building: not counted
    run_clock.start_epoch(1, 4, images=1000, done=200)  # epoch 2 of 4, resumed at 200 images
    clock.now += 2
    run_clock.advance(200)
    assert run_clock.rate() == 100.0  # images/s
    assert run_clock.eta() == (6.0, 6.0 + 2 * 10.0)  # 600 images left now, two 1000-image epochs after


def lines_of(progress_kwargs: dict, *, steps: int, seconds_per_step: float) -> list[str]:
    clock, printed = FakeClock(), []
    progress = LineProgress(printed.append, clock=clock, **progress_kwargs)
    progress.start_epoch(0, 3, steps=steps, step=0, images=steps * 10, done=0)
    for _ in range(steps):
        clock.now += seconds_per_step
        progress.advance(10, lambda: 1.25)
    return printed


def test_lines_every_n_steps_say_where_the_run_is_and_when_it_ends():
    printed = lines_of({"steps": 4}, steps=10, seconds_per_step=0.5)
    assert printed == [
        "epoch 1/3  step 4/10  loss 1.2500  20 img/s  ETA epoch 0:03, run 0:13",
        "epoch 1/3  step 8/10  loss 1.2500  20 img/s  ETA epoch 0:01, run 0:11",
    ]  # none at step 10: the epoch's own line follows


def test_lines_every_share_of_an_epoch_ignore_the_clock():
    printed = lines_of({"fraction": 0.25}, steps=10, seconds_per_step=100.0)  # 2.5 steps → every 2
    assert [line.split("  ")[1] for line in printed] == ["step 2/10", "step 4/10", "step 6/10", "step 8/10"]


def test_lines_every_n_seconds():
    printed = lines_of({"seconds": 3.0}, steps=10, seconds_per_step=1.0)
    assert [line.split("  ")[1] for line in printed] == ["step 3/10", "step 6/10", "step 9/10"]


@pytest.mark.parametrize("seconds_per_step, expected", [
    (1.0, ["step 10/100", "step 20/100", "step 30/100"]),  # 10% of the epoch, each ≥ 5 s apart
    (0.125, ["step 40/100", "step 80/100"]),  # 10% comes every 1.25 s: held back to one line per 5 s
    (4.0, ["step 8/100", "step 16/100", "step 24/100"]),  # 30 s pass before 10% of the epoch does
])
def test_the_default_cadence_is_30_seconds_or_a_tenth_of_an_epoch_but_calm(seconds_per_step, expected):
    printed = lines_of({}, steps=100, seconds_per_step=seconds_per_step)
    assert [line.split("  ")[1] for line in printed][:3] == expected


def test_without_a_terminal_the_cli_prints_plain_step_lines(tmp_path):
    result = run("sparse-train", "-c", DEMO_CONFIG, "-o", tmp_path / "run", *sets(*TINY), "--log-every", "1")
    steps = [line for line in result.output.splitlines() if line.startswith("epoch 1/1  step")]
    assert [line.split("  ")[1] for line in steps] == ["step 1/3", "step 2/3"]
    assert all("img/s  ETA epoch" in line and "\x1b[" not in line for line in steps)


def test_duration_formats_hours_minutes_seconds():
    assert (duration(59.9), duration(61), duration(3 * 3600 + 62)) == ("0:59", "1:01", "3:01:02")


# --------------------------------------------------------------------------- TensorBoard


def events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"histograms": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_holds_the_metrics_gamma_histograms_and_the_prune(tmp_path):
    out = tmp_path / "sparse"
    run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *sets(*TINY, "train.epochs=2"), "--tensorboard")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    board = events(out / "tb")
    tags = board.Tags()
    for tag, key in (("test/top1", "test_top1"), ("train/loss", "train_loss"), ("lr", "lr"),
                     ("gamma/frac_below_1e-3", "gamma_frac_below_1e-3"), ("images_per_sec", "images_per_sec")):
        logged = board.Scalars(tag)  # stored as float32
        assert [e.step for e in logged] == [r["epoch"] for r in rows], tag
        assert [e.value for e in logged] == pytest.approx([r[key] for r in rows], rel=1e-6), tag
    lam = yaml.safe_load((out / "config.yaml").read_text())["sparsity_resolved"]["sparsity"]
    assert board.Scalars("sparsity/lambda")[0].value == pytest.approx(lam, rel=1e-6)
    layers = [t for t in tags["histograms"] if t.startswith("gamma/layer/")]
    assert "gamma/all" in tags["histograms"] and "gamma/layer/features.bn0" in layers and len(layers) == 8
    all_gamma = board.Histograms("gamma/all")
    assert [h.step for h in all_gamma] == [1, 2] and all_gamma[0].histogram_value.num == 688  # channels

    result = json.loads(run("prune", out / "best.pt", "--ratio", "0.5", "-o", tmp_path / "p.pt", "--json").output)
    assert result["tensorboard"] == str(out / "tb")  # the parent run's board
    board = events(out / "tb")
    assert board.Scalars("prune/threshold")[0].step == 50
    assert board.Scalars("prune/threshold")[0].value == pytest.approx(result["threshold"])
    kept = board.Scalars("prune/kept/features.bn0")[0].value
    assert kept == pytest.approx(result["layers"][0]["kept"] / result["layers"][0]["total"])


def test_prune_writes_its_own_board_only_when_asked(tmp_path, tiny_run):
    out = tiny_run  # trained without a board
    assert not (out / "tb").exists()
    quiet = json.loads(run("prune", out / "best.pt", "--ratio", "0.3", "-o", tmp_path / "a.pt", "--json").output)
    assert "tensorboard" not in quiet and not (tmp_path / "a_tb").exists()
    asked = json.loads(run("prune", out / "best.pt", "--ratio", "0.3", "-o", tmp_path / "b.pt", "--json",
                           "--tensorboard").output)
    assert asked["tensorboard"] == str(tmp_path / "b_tb")
    assert events(tmp_path / "b_tb").Scalars("prune/params")[0].value == asked["params"]


def test_a_missing_tensorboard_is_exit_2_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now fails
    out = tmp_path / "run"
    result = run("sparse-train", "-c", DEMO_CONFIG, "-o", out, *sets(*TINY, "log.tensorboard=true"), code=2)
    assert "pip install 'slimctl[tb]'" in result.output and "Traceback" not in result.output
    assert not out.exists()


# --------------------------------------------------------------------------- compare


def test_compare_tabulates_and_draws_several_runs(tmp_path):
    for name, extra in (("baseline", "train.sparsity_budget=null"), ("sparse", "train.epochs=2")):
        run("sparse-train", "-c", DEMO_CONFIG, "-o", tmp_path / name, *sets(*TINY, extra))
    png = tmp_path / "cmp.png"
    result = json.loads(run("compare", tmp_path / "baseline", tmp_path / "sparse", "--png", png, "--json").output)
    assert [r["label"] for r in result["runs"]] == ["baseline", "sparse"]
    assert [len(r["rows"]) for r in result["runs"]] == [1, 2]
    assert result["runs"][1]["environment"]["device"] == "cpu"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = run("compare", tmp_path / "baseline", tmp_path / "sparse").output
    assert "baseline" in table and "sparse" in table


def test_compare_refuses_a_folder_without_metrics(tmp_path):
    result = run("compare", tmp_path, code=2)
    assert "is not a run folder (no metrics.jsonl)" in result.output


# --------------------------------------------------------------------------- the machine


def test_a_run_records_the_machine_and_report_shows_it(tiny_run):
    out = tiny_run
    env = yaml.safe_load((out / "config.yaml").read_text())["environment"]
    assert env["device"] == "cpu" and env["gpu"] is None and env["precision"] == "fp32"
    assert env["threads"] == torch.get_num_threads() and env["torch"] == str(torch.__version__)
    report = json.loads(run("report", out / "best.pt", "--json").output)
    assert report[-1]["environment"] == env
    table = run("report", out / "best.pt").output
    assert "trained on" in table


def test_machine_labels_tell_gpus_and_cpus_apart():
    assert machine_label({"gpu": "NVIDIA H200", "precision": "bf16"}) == "NVIDIA H200, bf16"
    cpu = {"gpu": None, "cpu": "Intel Xeon", "cpu_flags": ["avx2", "avx512f", "avx512_bf16"], "threads": 2,
           "precision": "bf16"}
    assert machine_label(cpu) == "Intel Xeon (avx512_bf16), 2 threads, bf16"
    assert machine_label({**cpu, "cpu_flags": ["avx2"], "precision": "fp32"}) == "Intel Xeon (avx2), 2 threads, fp32"
    assert machine_label(None) == "-"
    here = environment(torch.device("cpu"), torch.bfloat16)
    assert here["precision"] == "bf16" and here["device"] == "cpu"


def test_compare_png_replaces_only_its_own_kind_of_file(tmp_path, tiny_run):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"precious")
    for target in (checkpoint, tmp_path / "figure.txt"):
        result = run("compare", tiny_run, "--png", target, "--force", code=2)
        assert "name it *.png" in result.output
    assert checkpoint.read_bytes() == b"precious"
    png = tmp_path / "cmp.png"
    run("compare", tiny_run, "--png", png)
    assert "already exists; pass --force" in run("compare", tiny_run, "--png", png, code=2).output
    run("compare", tiny_run, "--png", png, "--force")
    (tmp_path / "dir.png").mkdir()
    assert "is a folder" in run("compare", tiny_run, "--png", tmp_path / "dir.png", code=2).output


def test_outputs_never_replace_a_device_or_a_folder(tmp_path, tiny_run):
    import os

    best = tiny_run / "best.pt"
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    for command in (["prune", best, "--ratio", "0.3"], ["export", best, "--format", "onnx"]):
        result = run(*command, "-o", fifo, "--force", code=2)
        assert "not a regular file" in result.output and fifo.exists()
        folder = tmp_path / f"{command[0]}_dir"
        folder.mkdir()
        assert "is a folder" in run(*command, "-o", folder, "--force", code=2).output


def test_compare_names_the_bad_line_and_refuses_foreign_files(tmp_path, tiny_run):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    run_dir.chmod(0o755)
    good = (tiny_run / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").chmod(0o644)
    (run_dir / "metrics.jsonl").write_text(good + "{not json\n")
    assert "metrics.jsonl line 2 is not valid JSON" in run("compare", run_dir, code=2).output
    (run_dir / "metrics.jsonl").write_text(good + '{"epoch": 2}\n')
    assert "line 2 lacks a number for test_top1" in run("compare", run_dir, code=2).output
    (run_dir / "metrics.jsonl").write_text(good)
    (run_dir / "config.yaml").chmod(0o644)
    (run_dir / "config.yaml").write_text("stage: !!python/object/apply:os.system ['echo x']\n")
    result = run("compare", run_dir, code=2)
    assert "is not a run's config" in result.output and "Traceback" not in result.output
