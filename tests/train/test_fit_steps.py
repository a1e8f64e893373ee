"""The named steps `fit` is made of, each alone: no data set, no CLI, a second or less."""

import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from slimctl.train import distributed
from slimctl.errors import SlimctlError
from slimctl.train import (
    EpochBar,
    EpochState,
    RunState,
    StopSignal,
    check_divergence,
    epoch_line,
    make_optimizer,
    metrics_row,
    rank_sinks,
    restore,
    resume_info,
    run_epoch,
    save_epoch,
    stopped_after_epoch,
    stopped_in_epoch,
    TrainStep,
    write_metrics,
)

CPU = torch.device("cpu")
CPU_RUN = Path("nowhere") / "run"  # only named in messages, never written


class CountingCollective:
    """Stands in for distributed.max_over_ranks: records each call, returns this rank's value."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, value: int, device: torch.device) -> int:
        self.calls += 1
        return value


@pytest.fixture
def collective(monkeypatch):
    fake = CountingCollective()
    monkeypatch.setattr(distributed, "max_over_ranks", fake)
    return fake


# --------------------------------------------------------------------------- stop signal


def test_single_process_agrees_every_step_and_stops_at_the_first_step_after_the_signal(collective):
    flag = {"signum": None}
    stop = StopSignal(flag, CPU)
    assert [stop.should_stop() for _ in range(3)] == [False, False, False]
    assert collective.calls == 3 and stop.signum == 0
    flag["signum"] = signal.SIGTERM
    assert stop.should_stop() is True
    assert stop.signum == signal.SIGTERM and stop.steps == 4 and collective.calls == 4


def test_under_ddp_ranks_agree_only_every_tenth_step(monkeypatch, collective):
    monkeypatch.setattr(distributed, "active", lambda: True)
    flag = {"signum": None}
    stop = StopSignal(flag, CPU)
    answers = []
    for step in range(1, 21):
        if step == 3:
            flag["signum"] = signal.SIGINT  # lands between two agreements
        answers.append(stop.should_stop())
    assert [i + 1 for i, a in enumerate(answers) if a] == [10, 20]  # never at steps 3..9
    assert collective.calls == 2  # one collective per 10 steps
    assert stop.signum == signal.SIGINT


def test_signalled_is_a_collective_even_without_a_signal(collective):
    stop = StopSignal({"signum": None}, CPU)
    assert stop.signalled() == 0 and collective.calls == 1
    stop.flag["signum"] = signal.SIGINT
    assert stop.signalled() == signal.SIGINT and stop.signum == signal.SIGINT


def test_the_agreed_signal_is_the_largest_any_rank_holds(monkeypatch):
    monkeypatch.setattr(distributed, "max_over_ranks", lambda value, device: max(value, signal.SIGTERM))
    stop = StopSignal({"signum": None}, CPU)  # this rank got nothing, another one got SIGTERM
    assert stop.should_stop() is True and stop.signum == signal.SIGTERM


# --------------------------------------------------------------------------- one epoch


class FakeLoader:
    """Five batches of 2; remembers set_epoch and skips the batches a resume has done."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.batches = [(torch.randn(2, 4, generator=g), torch.randint(0, 3, (2,), generator=g)) for _ in range(5)]
        self.start_batch = 0
        self.epoch = None

    num_samples = 10

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches[self.start_batch:])


class FakeProgress:
    """Records the calls slimctl.output.progress reporters get; reads the running loss at every step."""

    def __init__(self) -> None:
        self.calls = []

    def start_epoch(self, epoch, epochs, **kwargs):
        self.calls.append(("start_epoch", epoch, epochs, kwargs))

    def advance(self, images, mean_loss):
        self.calls.append(("advance", images, round(mean_loss(), 6)))


def _epoch(stop, *, partial=None, bar=None, lr=0.5):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer, scaler = make_optimizer(model, lr=0.1, momentum=0.9, weight_decay=0.0, device=CPU, dtype=None)
    loader = FakeLoader()
    step = TrainStep(model, optimizer, gammas=[], sparsity=0.0, device=CPU, dtype=None, scaler=scaler)
    state = run_epoch(step, loader, epoch=2, lr=lr, partial=partial, stop=stop, bar=bar or EpochBar(None, 4))
    return state, optimizer, loader


def test_run_epoch_sets_the_lr_and_trains_every_batch():
    state, optimizer, loader = _epoch(StopSignal({"signum": None}, CPU), lr=0.25)
    assert [g["lr"] for g in optimizer.param_groups] == [0.25]
    assert loader.epoch == 2 and loader.start_batch == 0
    assert (state.steps, state.images, state.completed) == (5, 10, True)


def test_run_epoch_stops_after_the_step_the_signal_arrived_in():
    stop = StopSignal({"signum": signal.SIGINT}, CPU)
    state, _, _ = _epoch(stop)
    assert (state.steps, state.images, state.completed) == (1, 2, False)


def test_run_epoch_finishes_a_partial_epoch_and_reports_progress():
    progress = FakeProgress()
    partial = EpochState(loss_sum=1.0, correct=1, images=4, steps=2, seconds=1.0)
    state, _, loader = _epoch(StopSignal({"signum": None}, CPU), partial=partial, bar=EpochBar(progress, 4))
    assert loader.start_batch == 2  # the batches done before the stop are skipped
    assert (state.steps, state.images, state.completed) == (5, 10, True)
    assert progress.calls[0] == ("start_epoch", 2, 4, {"steps": 5, "step": 2, "images": 10, "done": 4})
    advances = progress.calls[1:]
    assert [c[1] for c in advances] == [2, 2, 2]
    # The running mean loss over the epoch so far, the partial epoch's sum included (1.0 over 4 images).
    assert advances[0][2] != advances[1][2] and abs(advances[-1][2] - state.loss) < 1e-5


def test_no_progress_bar_means_no_callback():
    assert EpochBar(None, 3).start(0, FakeLoader(), done=0) is None


# --------------------------------------------------------------------------- divergence


def test_divergence_raises_with_the_epoch_and_step():
    state = EpochState(steps=9, first_bad_step=4)
    with pytest.raises(SlimctlError) as info:
        check_divergence(state, epoch=2, lr=0.05, sparsity=1e-4, run_dir=CPU_RUN, device=CPU)
    message = str(info.value)
    assert "training diverged" in message and "epoch 3, step 5" in message
    assert "lr 0.05" in message and "λ 0.0001" in message and str(CPU_RUN / "last.pt") in message



def test_a_finite_loss_is_not_divergence():
    check_divergence(EpochState(steps=9), epoch=0, lr=0.1, sparsity=0.0, run_dir=CPU_RUN, device=CPU)


def test_divergence_on_another_rank_stops_this_one(monkeypatch):
    monkeypatch.setattr(distributed, "any_rank", lambda flag, device: True)
    with pytest.raises(SlimctlError, match="diverged"):
        check_divergence(EpochState(steps=9), epoch=0, lr=0.1, sparsity=0.0, run_dir=CPU_RUN, device=CPU)


# --------------------------------------------------------------------------- metrics, saving, logging

ROW_KEYS = ["epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "seconds", "images_per_sec",
            "gamma_mean_abs", "gamma_frac_below_1e-2", "gamma_frac_below_1e-3"]


def test_metrics_row_has_the_documented_keys():
    gammas = [nn.Parameter(torch.tensor([0.0005, -0.5, 0.005, 1.0]))]
    state = EpochState(loss_sum=12.0, correct=3, images=6, steps=3, seconds=2.0, completed=True)
    row = metrics_row(4, 0.01, state, 1.5, 40.0, gammas)
    assert list(row) == ROW_KEYS
    assert (row["epoch"], row["lr"], row["train_loss"], row["train_top1"]) == (5, 0.01, 2.0, 50.0)
    assert (row["test_loss"], row["test_top1"], row["seconds"], row["images_per_sec"]) == (1.5, 40.0, 2.0, 3.0)
    assert row["gamma_frac_below_1e-2"] == 0.5 and row["gamma_frac_below_1e-3"] == 0.25


def test_metrics_row_under_ddp_records_the_gamma_drift(monkeypatch):
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "max_diff_from_rank0", lambda tensors: 0.0)
    state = EpochState(loss_sum=1.0, images=2, seconds=1.0)
    row = metrics_row(0, 0.1, state, 1.0, 10.0, [nn.Parameter(torch.ones(2))])
    assert list(row) == [*ROW_KEYS, "ddp_gamma_max_diff"] and row["ddp_gamma_max_diff"] == 0.0


def test_best_is_saved_only_on_improvement(tmp_path):
    saved = []
    run = RunState()
    for epoch, top1 in enumerate([10.0, 20.0, 20.0, 15.0, 30.0]):
        is_best = run.record({"test_top1": top1})
        metrics = {"top1": top1, "epoch": epoch + 1, "best_top1": run.best_top1}
        save_epoch(lambda path, model, m, resume: saved.append((path.name, m["epoch"], resume)), tmp_path, None,
                   metrics, is_best=is_best, resume={"epoch": epoch + 1})
    assert [(n, e) for n, e, _ in saved if n == "best.pt"] == [("best.pt", 1), ("best.pt", 2), ("best.pt", 5)]
    assert [e for n, e, _ in saved if n == "last.pt"] == [1, 2, 3, 4, 5]
    assert all((r is None) == (n == "best.pt") for n, _, r in saved)  # only last.pt is resumable
    assert run.best_top1 == 30.0 and len(run.rows) == 5


def test_epoch_line():
    row = {"epoch": 3, "lr": 0.001, "train_loss": 2.23021, "train_top1": 15.0, "test_top1": 9.5,
           "images_per_sec": 584.4, "gamma_mean_abs": 0.49831}
    assert epoch_line(row, 12, False) == (
        "epoch   3/12  lr 0.001  loss 2.2302  train 15.00%  test  9.50%  584 img/s  |γ| 0.4983")
    assert epoch_line(row, 12, True).endswith("|γ| 0.4983  *best")


def test_interruption_messages():
    first = stopped_in_epoch(signal.SIGTERM, epoch=1, steps=2, of=5, run_dir=CPU_RUN)
    assert first.signum == signal.SIGTERM
    assert str(first) == (f"stopped at epoch 2, step 2/5; {CPU_RUN / 'last.pt'} holds the run: "
                          "repeat the command with --resume to continue")
    after = stopped_after_epoch(signal.SIGINT, epoch=0, run_dir=CPU_RUN)
    assert after.signum == signal.SIGINT and str(after).startswith("stopped after epoch 1; ")


# --------------------------------------------------------------------------- ranks and resume


def test_only_the_main_rank_writes_logs_and_shows_progress(tmp_path):
    said = []
    save = lambda *args: said.append("save")  # noqa: E731
    main = rank_sinks(True, save=save, log=said.append, progress="bar")
    assert main.write_rows is write_metrics and main.progress == "bar"
    main.save(tmp_path / "x", None, {}, None)
    main.log("hello")
    other = rank_sinks(False, save=save, log=said.append, progress="bar")
    other.save(tmp_path / "x", None, {}, None)
    other.log("hello")
    other.write_rows(tmp_path / "metrics.jsonl", [{"epoch": 1}])
    assert said == ["save", "hello"] and other.progress is None
    assert not (tmp_path / "metrics.jsonl").exists()


def _trained_optimizer():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer, scaler = make_optimizer(model, lr=0.1, momentum=0.9, weight_decay=1e-4, device=CPU, dtype=None)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer, scaler


def test_a_fresh_run_restores_nothing():
    _, optimizer, scaler = _trained_optimizer()
    assert restore(None, optimizer, scaler, is_main=True) == RunState()


def test_resume_info_round_trips_through_restore():
    _, optimizer, scaler = _trained_optimizer()
    run = RunState(rows=[{"epoch": 1}, {"epoch": 2}], best_top1=42.0)
    partial = EpochState(loss_sum=3.0, correct=2, images=8, steps=4, seconds=1.5)
    info = resume_info(run, optimizer, scaler, 2, partial)
    assert list(info) == ["epoch", "partial", "optimizer", "scaler", "best_top1", "metrics", "rng"]
    expected_draw = torch.rand(3)  # the RNG continues from where resume_info saw it
    fresh_model = nn.Linear(4, 3)
    fresh, fresh_scaler = make_optimizer(fresh_model, lr=0.1, momentum=0.9, weight_decay=1e-4, device=CPU, dtype=None)
    restored = restore(info, fresh, fresh_scaler, is_main=True)
    assert torch.equal(torch.rand(3), expected_draw)
    assert restored == RunState(rows=run.rows, best_top1=42.0, start_epoch=2, partial=partial)
    assert restored.rows is not run.rows  # a copy: the saved list is never appended to
    restored_state, saved_state = fresh.state_dict()["state"], optimizer.state_dict()["state"]
    assert len(restored_state) == len(saved_state) == 2  # weight and bias momentum
    assert all(torch.equal(restored_state[i]["momentum_buffer"], saved_state[i]["momentum_buffer"]) for i in saved_state)
    assert restored.take_partial() == partial and restored.take_partial() is None


def test_other_ranks_resume_a_partial_epoch_without_its_sums():
    _, optimizer, scaler = _trained_optimizer()
    partial = EpochState(loss_sum=3.0, correct=2, images=8, steps=4, seconds=1.5)
    info = resume_info(RunState(), optimizer, scaler, 0, partial)
    restored = restore(info, optimizer, scaler, is_main=False)
    assert restored.partial == EpochState(loss_sum=0.0, correct=0, images=0, steps=4, seconds=1.5)


def test_fp16_gets_a_grad_scaler_whose_state_is_resumed():
    model = nn.Linear(4, 3)
    assert make_optimizer(model, lr=0.1, momentum=0.0, weight_decay=0.0, device=CPU, dtype=torch.bfloat16)[1] is None
    optimizer, scaler = make_optimizer(model, lr=0.1, momentum=0.0, weight_decay=0.0, device=CPU, dtype=torch.float16)
    assert isinstance(scaler, torch.amp.GradScaler)
    scaler.load_state_dict({**scaler.state_dict(), "scale": 8.0, "_growth_tracker": 3})
    info = resume_info(RunState(), optimizer, scaler, 1, None)
    _, fresh_scaler = make_optimizer(model, lr=0.1, momentum=0.0, weight_decay=0.0, device=CPU, dtype=torch.float16)
    restore(info, optimizer, fresh_scaler, is_main=True)
    assert fresh_scaler.state_dict()["scale"] == 8.0 and fresh_scaler.state_dict()["_growth_tracker"] == 3
