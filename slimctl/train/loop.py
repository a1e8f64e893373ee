"""`fit`: a run as named steps — optimizer, resume, stop signal, epoch, divergence check, evaluation, record, save, log — where only rank 0 writes."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from slimctl.base.device import compile_mode
from slimctl.base.files import atomic_write_text
from slimctl.io.config import TrainConfig
from slimctl.core.sparsity import SparsityTerm, gamma_stats
from slimctl.data.plain import trainer_loader
from slimctl.errors import SlimctlError
from slimctl.train import distributed
from slimctl.train.interrupt import graceful_stop, StopSignal, stopped_in_epoch, stopped_after_epoch
from slimctl.train.schedule import lr_at, milestone_epochs
from slimctl.train.step import EpochState, Distill, TrainStep, train_one_epoch, evaluate, make_optimizer


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _summed_over_ranks(state: EpochState, device: torch.device) -> EpochState:
    if not distributed.active():
        return state
    sums = torch.tensor([state.loss_sum, state.correct, state.images], dtype=torch.float64, device=device)
    distributed.all_reduce_sum(sums)
    return dataclasses.replace(state, loss_sum=float(sums[0]), correct=int(sums[1]), images=int(sums[2]))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class RunState:
    """What a run carries from epoch to epoch, and through last.pt across a resume."""

    rows: list[dict[str, Any]] = field(default_factory=list)  # one metrics row per finished epoch
    best_top1: float = -1.0
    start_epoch: int = 0  # epochs fully done when this call began
    partial: EpochState | None = None  # the epoch a stop left half done, to be finished first

    def take_partial(self) -> EpochState | None:
        """The half-done epoch, once: every later epoch starts from scratch."""
        partial, self.partial = self.partial, None
        return partial

    def record(self, row: dict[str, Any]) -> bool:
        """Append a finished epoch's metrics row; True when its test top-1 beats every earlier epoch."""
        self.rows.append(row)
        is_best = row["test_top1"] > self.best_top1
        self.best_top1 = max(self.best_top1, row["test_top1"])
        return is_best


@dataclass
class Sinks:
    """Where a rank's output goes."""

    save: Callable[[Path, nn.Module, dict[str, Any], dict[str, Any] | None], None]
    write_rows: Callable[[Path, list[dict[str, Any]]], None]
    log: Callable[[str], None]
    progress: Any
    on_epoch: Callable[[dict[str, Any]], None]  # each finished epoch's metrics row (TensorBoard)


def rank_sinks(is_main: bool, *, save, log, progress, on_epoch=None) -> Sinks:
    """The one place ranks differ in output: rank 0 writes and logs, every other rank stays silent."""
    silent = lambda *args: None  # noqa: E731
    if is_main:
        return Sinks(save=save, write_rows=write_metrics, log=log, progress=progress, on_epoch=on_epoch or silent)
    return Sinks(save=silent, write_rows=silent, log=silent, progress=None, on_epoch=silent)


class EpochBar:
    """Per-step progress (`slimctl.output.progress`: a bar on a terminal, plain lines elsewhere); nothing
    without `progress`."""

    def __init__(self, progress, epochs: int) -> None:
        self.progress, self.epochs = progress, epochs

    def start(self, epoch: int, loader, *, done: int, step: int = 0) -> Callable[[int, Callable[[], float]], None] | None:
        """Start 0-based `epoch` (`done` images and `step` steps already trained); the per-step callback."""
        if self.progress is None:
            return None
        self.progress.start_epoch(epoch, self.epochs, steps=len(loader), step=step, images=loader.num_samples,
                                  done=done)
        return self.progress.advance


def restore(resume_state: dict[str, Any] | None, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler | None, *, is_main: bool) -> RunState:
    """Load a last.pt's `resume` into the optimizer, scaler and RNG; the run's state (a fresh one without)."""
    if resume_state is None:
        return RunState()
    optimizer.load_state_dict(resume_state["optimizer"])
    if scaler is not None and resume_state.get("scaler"):
        scaler.load_state_dict(resume_state["scaler"])
    partial = EpochState(**resume_state["partial"]) if resume_state.get("partial") else None
    if partial is not None and not is_main:  # the saved sums are all ranks' (reduced): count them once
        partial = dataclasses.replace(partial, loss_sum=0.0, correct=0, images=0)
    run = RunState(rows=list(resume_state["metrics"]), best_top1=float(resume_state["best_top1"]),
                   start_epoch=int(resume_state["epoch"]), partial=partial)
    set_rng_state(resume_state["rng"])
    return run


def resume_info(run: RunState, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                epoch: int, state: EpochState | None) -> dict[str, Any]:
    """What `restore` needs to continue exactly here: `epoch` epochs done, `state` the one in progress."""
    return {
        "epoch": epoch,  # epochs fully done
        "partial": None if state is None else dataclasses.asdict(state),  # the epoch in progress
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "best_top1": run.best_top1,
        "metrics": run.rows,
        "rng": rng_state(),
    }


def run_epoch(step: TrainStep, loader, *, epoch: int, lr: float, partial: EpochState | None, stop: StopSignal,
              bar: EpochBar) -> EpochState:
    """Train 0-based `epoch` at `lr`, finishing `partial` if a stop left it half done; sums over ranks."""
    for group in step.optimizer.param_groups:
        group["lr"] = lr
    loader.set_epoch(epoch, start_batch=partial.steps if partial else 0)
    on_step = bar.start(epoch, loader, done=partial.images if partial else 0, step=partial.steps if partial else 0)
    state = train_one_epoch(step, loader, state=partial, should_stop=stop.should_stop, on_step=on_step)
    # Train metrics over all ranks' samples (ranks finish or stop at the same step).
    return _summed_over_ranks(state, step.device)


def check_divergence(state: EpochState, *, epoch: int, lr: float, sparsity: float, run_dir: Path,
                     device: torch.device) -> None:
    """Raise on every rank when the loss became NaN/inf on any (every rank stops, not just one)."""
    if distributed.any_rank(state.first_bad_step >= 0, device):
        raise SlimctlError(
            f"training diverged: the loss became NaN/inf at epoch {epoch + 1}, step {state.first_bad_step + 1} "
            f"(lr {lr:g}, sparsity λ {sparsity:g}); {run_dir / 'last.pt'} holds the last good state. "
            "Lower train.lr or λ and start again"
        )


def metrics_row(epoch: int, lr: float, state: EpochState, test_loss: float, test_top1: float,
                gammas: list[nn.Parameter]) -> dict[str, Any]:
    """metrics.jsonl's row for 0-based `epoch` (under torchrun also a collective: ddp_gamma_max_diff)."""
    row = {
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": state.loss,
        "train_top1": state.top1,
        "test_loss": test_loss,
        "test_top1": test_top1,
        "seconds": state.seconds,
        "images_per_sec": state.images / state.seconds,  # all ranks together
        **gamma_stats(gammas),
    }
    if distributed.active():  # 0.0 when DDP kept every rank's γ identical, as it must
        row["ddp_gamma_max_diff"] = distributed.max_diff_from_rank0(gammas)
    return row


def save_epoch(save, run_dir: Path, model: nn.Module, metrics: dict[str, Any], *, is_best: bool,
               resume: dict[str, Any]) -> None:
    """best.pt when the epoch improved on every earlier one; last.pt, resumable, always."""
    if is_best:
        save(run_dir / "best.pt", model, metrics, None)
    save(run_dir / "last.pt", model, metrics, resume)


def epoch_line(row: dict[str, Any], epochs: int, is_best: bool) -> str:
    """The log line of a finished epoch."""
    return (
        f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.4g}  loss {row['train_loss']:.4f}  "
        f"train {row['train_top1']:5.2f}%  test {row['test_top1']:5.2f}%  "
        f"{row['images_per_sec']:.0f} img/s  |γ| {row['gamma_mean_abs']:.4f}"
        + ("  *best" if is_best else "")
    )


@dataclass(frozen=True)
class RunIO:
    """Where and how a run reports: its folder, `save(path, model, metrics, resume)` (the caller
    knows the checkpoint's metadata), progress, log, whether this process is rank 0 (the only one
    that writes and logs) and `on_epoch(row)` (each finished epoch's metrics row, e.g. for TensorBoard)."""

    run_dir: Path
    save: Callable[[Path, nn.Module, dict[str, Any], dict[str, Any] | None], None]
    progress: Any = None
    log: Callable[[str], None] = print
    is_main: bool = True
    on_epoch: Callable[[dict[str, Any]], None] | None = None


def fit(
    model: nn.Module,
    train_loader,
    test_loader,
    train: TrainConfig,
    *,
    sparsity: float,
    gammas: list[nn.Parameter],
    device: torch.device,
    dtype: torch.dtype | None,
    io: RunIO,
    resume_state: dict[str, Any] | None = None,
    distill: Distill | None = None,
) -> dict[str, Any]:
    """Train for `train.epochs` by the `train` recipe (lr, momentum, weight decay, milestones, compile
    mode), evaluating after each epoch; writes metrics.jsonl, last.pt and best.pt into `io.run_dir`.

    `sparsity` is λ (the recipe may state it as a budget: the caller derives λ) of the regularizer
    `train.regularizer` (l1 or polarization, with its t and γ bound) on `gammas`.
    `resume_state` (from a last.pt) continues a run exactly where it stopped, mid-epoch included.
    SIGINT/SIGTERM stop at the next step with a resumable last.pt (raises `Interrupted`).
    Under torchrun every rank calls this; only `io.is_main` (rank 0) writes and logs.
    `distill` adds a teacher's soft targets to the loss (fine-tuning with knowledge distillation).
    The loaders are slimctl's, or any iterable of (x, y) batches with a length (a DataLoader).
    """
    epochs, lr, run_dir = train.epochs, train.lr, io.run_dir
    # A plain DataLoader works too (see PlainLoader for what resuming then guarantees).
    train_loader = trainer_loader(train_loader, device=device, channels_last=train.channels_last)
    test_loader = trainer_loader(test_loader, device=device, channels_last=train.channels_last)
    milestones = milestone_epochs(train.milestones, epochs)
    sinks = rank_sinks(io.is_main, save=io.save, log=io.log, progress=io.progress, on_epoch=io.on_epoch)
    optimizer, scaler = make_optimizer(model, lr=lr, momentum=train.momentum, weight_decay=train.weight_decay,
                                       device=device, dtype=dtype)
    run = restore(resume_state, optimizer, scaler, is_main=io.is_main)
    bar = EpochBar(sinks.progress, epochs)
    term = SparsityTerm(sparsity, train.regularizer, train.polarization_t, train.gamma_bound)
    step = TrainStep(model, optimizer, gammas=gammas, sparsity=term, device=device, dtype=dtype, scaler=scaler,
                     mode=compile_mode(train.compile), warn=sinks.log, distill=distill)
    with graceful_stop() as flag:
        stop = StopSignal(flag, device)
        for epoch in range(run.start_epoch, epochs):
            epoch_lr = lr_at(epoch, lr=lr, milestones=milestones, decay=train.lr_decay)
            state = run_epoch(step, train_loader, epoch=epoch, lr=epoch_lr, partial=run.take_partial(), stop=stop,
                              bar=bar)
            check_divergence(state, epoch=epoch, lr=epoch_lr, sparsity=sparsity, run_dir=run_dir, device=device)
            if not state.completed:  # a signal stopped the epoch: keep it resumable from this step
                sinks.save(run_dir / "last.pt", model, {"epoch": epoch},
                           resume_info(run, optimizer, scaler, epoch, state))
                raise stopped_in_epoch(stop.signum, epoch=epoch, steps=state.steps, of=len(train_loader),
                                       run_dir=run_dir)
            test_loss, test_top1 = evaluate(model, test_loader, device=device, dtype=dtype)
            row = metrics_row(epoch, epoch_lr, state, test_loss, test_top1, gammas)
            is_best = run.record(row)
            metrics = {"top1": test_top1, "loss": test_loss, "epoch": epoch + 1, "best_top1": run.best_top1}
            save_epoch(sinks.save, run_dir, model, metrics, is_best=is_best,
                       resume=resume_info(run, optimizer, scaler, epoch + 1, None))
            sinks.write_rows(run_dir / "metrics.jsonl", run.rows)
            sinks.on_epoch(row)
            sinks.log(epoch_line(row, epochs, is_best))
            if epoch + 1 < epochs and stop.signalled():
                raise stopped_after_epoch(stop.signum, epoch=epoch, run_dir=run_dir)
    return {"best_top1": run.best_top1, "epochs": run.rows}
