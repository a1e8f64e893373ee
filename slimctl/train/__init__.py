"""The training loop shared by sparse-train and finetune: fit / train_one_epoch / evaluate.

Sparsity (the paper's L1 on BN scales) is a subgradient added after `backward()` and before
`step()`: grad(γ) += λ·sign(γ), as one fused foreach op over every ranked BN. With fp16 and a
GradScaler the gradients are unscaled first, so λ is never divided by the loss scale.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from slimctl.train import distributed
from slimctl.base.device import autocast
from slimctl.errors import SlimctlError, is_out_of_memory
from slimctl.base.files import atomic_write_text
from slimctl.core.sparsity import add_sparsity_grad, gamma_stats


# --------------------------------------------------------------------------- schedule


def milestone_epochs(fractions: tuple[float, ...] | list[float], epochs: int) -> list[int]:
    """Fractions of the run → integer epochs (≥ 1) at which the lr decays.

    Integers on purpose: the reference compared floats (`epoch in [epochs*0.5, …]`), so for odd
    epoch counts a decay silently never fired.
    """
    return sorted(max(1, int(f * epochs)) for f in fractions)


def lr_at(epoch: int, *, lr: float, milestones: list[int], decay: float) -> float:
    """lr of 0-based `epoch`: decayed once for every milestone already reached."""
    return lr * decay ** sum(epoch >= m for m in milestones)


def lr_sum(*, lr: float, milestones: list[int], decay: float, epochs: int, steps_per_epoch: int) -> float:
    """Σ_t lr_t over every optimizer step of the schedule (lr constant within an epoch): what the
    L1 budget multiplies λ by (`slimctl.core.sparsity.l1_budget`)."""
    return steps_per_epoch * sum(lr_at(e, lr=lr, milestones=milestones, decay=decay) for e in range(epochs))


# --------------------------------------------------------------------------- interruption


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped a run at a step boundary after writing a resumable last.pt."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


@contextmanager
def graceful_stop():
    """First SIGINT/SIGTERM: ask the loop to stop at the next step (`flag["signum"]` is set).
    A second one: KeyboardInterrupt at once (the checkpoint on disk is still the previous one)."""
    flag: dict[str, int | None] = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be installed from the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["signum"] is not None:
            raise KeyboardInterrupt
        flag["signum"] = signum

    # A signal ignored at start stays ignored (Unix convention: e.g. SIGINT of a background job of
    # a non-interactive shell, or under nohup), so a terminal's Ctrl-C does not stop that run.
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------- one epoch


@dataclass
class EpochState:
    """Running sums of one training epoch; saved on interruption so the epoch can be finished."""

    loss_sum: float = 0.0  # Σ loss·batch over the steps done
    correct: int = 0
    images: int = 0
    steps: int = 0
    seconds: float = 0.0
    first_bad_step: int = -1  # first step whose loss was NaN/inf (-1: none)
    completed: bool = False

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.images)

    @property
    def top1(self) -> float:
        return 100.0 * self.correct / max(1, self.images)


@dataclass
class Distill:
    """Knowledge distillation from `teacher` (eval mode, no gradients, on the same augmented batch):
    loss = (1 − alpha)·CE + alpha·T²·KL(teacher_T ‖ student_T), T = `temperature`."""

    teacher: nn.Module
    alpha: float
    temperature: float
    source: str = ""  # where the teacher came from (recorded with the run)

    def loss(self, ce: torch.Tensor, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.teacher(x)
        t = self.temperature
        kl = F.kl_div(F.log_softmax(logits.float() / t, dim=1), F.log_softmax(target.float() / t, dim=1),
                      log_target=True, reduction="batchmean")
        return (1 - self.alpha) * ce + self.alpha * t * t * kl


class TrainStep:
    """One optimizer step: forward under autocast, backward, grad(γ) += λ·sign(γ), SGD; eager or compiled.

    Compiled (`mode`, a torch.compile mode): two graphs, the model's forward+backward (AOTAutograd)
    and the update (the λ·sign(γ) foreach op and the SGD step, fused by inductor). Shapes are
    static: a batch of another size than the first (an epoch's last partial batch) runs eager
    rather than recompiling. Compiling is lazy, so a failure shows at a step: then one warning,
    that step is redone eagerly (grads are zeroed first, nothing is lost) and the run continues
    eager. Out of memory is never taken for a compile failure. With fp16's GradScaler the update
    stays eager (its inf check reads a device flag on the host).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, gammas: list[nn.Parameter],
                 sparsity: float, device: torch.device, dtype: torch.dtype | None,
                 scaler: torch.amp.GradScaler | None = None, mode: str | None = None,
                 warn: Callable[[str], None] = print, distill: Distill | None = None) -> None:
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.distill = distill  # the teacher runs eager: only the student's graph is compiled
        self.gammas, self.sparsity = gammas, sparsity
        self.device, self.dtype = device, dtype
        self.mode, self.warn = mode, warn
        self.batch_size: int | None = None  # the compiled graphs' batch size: the first batch's
        self.compiled_forward = self.compiled_update = None
        if mode is not None:
            self.compiled_forward = torch.compile(model, mode=mode, dynamic=False)
            # The optimizer's own graph needs no CUDA graph: it is a handful of fused foreach kernels.
            self.compiled_update = torch.compile(self.update, dynamic=False) if scaler is None else self.update
        # CUDA graphs replay into the same output memory: each step must be marked as a new one.
        self.cudagraphs = mode in ("reduce-overhead", "max-autotune") and device.type == "cuda"

    def update(self) -> None:
        """grad(γ) += λ·sign(γ), then the optimizer step (no GradScaler)."""
        add_sparsity_grad(self.gammas, self.sparsity)
        self.optimizer.step()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Train on one batch; (loss as a 0-d float32 tensor, logits), both detached, still on the device."""
        if self.batch_size is None:
            self.batch_size = x.shape[0]
        if self.compiled_forward is not None and x.shape[0] == self.batch_size:
            try:
                return self._step(x, y, self.compiled_forward, self.compiled_update, new_graph_step=self.cudagraphs)
            except Exception as exc:  # noqa: BLE001 - any compile failure; the eager step re-raises real errors
                if is_out_of_memory(exc):
                    raise
                self._give_up(exc)
        return self._step(x, y, self.model, self.update, new_graph_step=False)

    def _give_up(self, exc: Exception) -> None:
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        self.warn(f"warning: train.compile {self.mode!r} failed ({type(exc).__name__}: {first_line}); "
                  "training continues eager")
        self.compiled_forward = self.compiled_update = None

    def _step(self, x: torch.Tensor, y: torch.Tensor, forward: Callable, update: Callable, *,
              new_graph_step: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if new_graph_step:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(self.device, self.dtype):
            logits = forward(x)
            loss = F.cross_entropy(logits, y)
            if self.distill is not None:
                loss = self.distill.loss(loss, logits, x)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # λ·sign(γ) must meet unscaled gradients
            add_sparsity_grad(self.gammas, self.sparsity)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            update()
        return loss.detach().float(), logits.detach()


def train_one_epoch(
    step: TrainStep,
    loader,
    *,
    state: EpochState | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_step: Callable[[int, Callable[[], float]], None] | None = None,
) -> EpochState:
    """One pass over `loader` (which already skips the `state.steps` batches done before a resume),
    one `step` per batch (its model, optimizer, λ, device and precision; compiled graphs carry over
    between epochs). Nothing in the loop reads the device: the running sums stay there and are read
    once, at the end of the epoch.
    """
    state = state or EpochState()
    model, device = step.model, step.device
    model.train()
    loss_sum = torch.tensor(state.loss_sum, device=device)
    correct = torch.tensor(state.correct, device=device)
    first_bad = torch.tensor(state.first_bad_step, device=device)
    images, steps = state.images, state.steps
    start = time.perf_counter()
    completed = True
    for x, y in loader:
        loss, logits = step(x, y)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), steps, first_bad)
        loss_sum += loss * y.numel()
        correct += (logits.argmax(1) == y).sum()
        images += y.numel()
        steps += 1
        if on_step is not None:  # the running loss is read from the device only if the callback asks
            on_step(y.numel(), lambda: float(loss_sum) / max(1, images))
        if should_stop():
            completed = steps == len(loader)
            break
    sums = (float(loss_sum), int(correct), int(first_bad))  # the epoch's one read of the device (waits for it)
    return EpochState(
        loss_sum=sums[0], correct=sums[1], images=images, steps=steps,
        seconds=state.seconds + time.perf_counter() - start, first_bad_step=sums[2], completed=completed,
    )


@torch.inference_mode()
def evaluate(model: nn.Module, loader, *, device: torch.device, dtype: torch.dtype | None = None) -> tuple[float, float]:
    """(mean cross-entropy, top-1 %) over the whole loader."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    images = 0
    for x, y in loader:
        with autocast(device, dtype):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        images += y.numel()
    count = torch.tensor(images, device=device)
    distributed.all_reduce_sum(loss_sum, correct, count)  # each rank evaluated its own share
    return float(loss_sum) / int(count), 100.0 * float(correct) / int(count)


# --------------------------------------------------------------------------- the run


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


class StopSignal:
    """When to stop: the signal this rank received (`flag` from `graceful_stop`), agreed across ranks.

    Under torchrun only one rank may receive it, so every rank acts on the largest signal number
    any rank holds (`signum`), and all of them stop at the same step.
    """

    def __init__(self, flag: dict[str, int | None], device: torch.device) -> None:
        self.flag = flag
        self.device = device
        self.steps = 0  # training steps seen, over every epoch of this call
        self.signum = 0  # the signal every rank acts on (0: none)

    def signalled(self) -> int:
        """Agree on the signal (a collective under torchrun): its number on every rank, or 0."""
        self.signum = distributed.max_over_ranks(self.flag["signum"] or 0, self.device)
        return self.signum

    def should_stop(self) -> bool:
        """Called after every step. Agreeing costs a collective, so under DDP only every 10 steps."""
        self.steps += 1
        if not distributed.active():
            return self.signalled() > 0
        return self.steps % 10 == 0 and self.signalled() > 0


def make_optimizer(model: nn.Module, *, lr: float, momentum: float, weight_decay: float, device: torch.device,
                   dtype: torch.dtype | None) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler | None]:
    """SGD over every parameter, and a GradScaler when training in fp16."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return optimizer, scaler


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


def stopped_in_epoch(signum: int, *, epoch: int, steps: int, of: int, run_dir: Path) -> Interrupted:
    return Interrupted(
        signum,
        f"stopped at epoch {epoch + 1}, step {steps}/{of}; "
        f"{run_dir / 'last.pt'} holds the run: repeat the command with --resume to continue",
    )


def stopped_after_epoch(signum: int, *, epoch: int, run_dir: Path) -> Interrupted:
    return Interrupted(
        signum,
        f"stopped after epoch {epoch + 1}; {run_dir / 'last.pt'} holds the run: "
        "repeat the command with --resume to continue",
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


def fit(
    model: nn.Module,
    train_loader,
    test_loader,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    milestones: list[int],
    lr_decay: float,
    sparsity: float,
    gammas: list[nn.Parameter],
    device: torch.device,
    dtype: torch.dtype | None,
    run_dir: Path,
    save: Callable[[Path, nn.Module, dict[str, Any], dict[str, Any] | None], None],
    resume_state: dict[str, Any] | None = None,
    progress=None,
    log: Callable[[str], None] = print,
    is_main: bool = True,
    compile_mode: str | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    distill: Distill | None = None,
) -> dict[str, Any]:
    """Train for `epochs`, evaluating after each; writes metrics.jsonl, last.pt and best.pt.

    `save(path, model, metrics, resume)` writes a checkpoint (the caller knows its metadata).
    `resume_state` (from a last.pt) continues a run exactly where it stopped, mid-epoch included.
    SIGINT/SIGTERM stop at the next step with a resumable last.pt (raises `Interrupted`).
    Under torchrun every rank calls this; only `is_main` (rank 0) writes and logs.
    `compile_mode` (a torch.compile mode, or None for eager) compiles the training step (`TrainStep`).
    `on_epoch(row)` sees each finished epoch's metrics row (main rank only), e.g. for TensorBoard.
    `distill` adds a teacher's soft targets to the loss (fine-tuning with knowledge distillation).
    """
    sinks = rank_sinks(is_main, save=save, log=log, progress=progress, on_epoch=on_epoch)
    optimizer, scaler = make_optimizer(model, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                       device=device, dtype=dtype)
    run = restore(resume_state, optimizer, scaler, is_main=is_main)
    bar = EpochBar(sinks.progress, epochs)
    step = TrainStep(model, optimizer, gammas=gammas, sparsity=sparsity, device=device, dtype=dtype, scaler=scaler,
                     mode=compile_mode, warn=sinks.log, distill=distill)
    with graceful_stop() as flag:
        stop = StopSignal(flag, device)
        for epoch in range(run.start_epoch, epochs):
            epoch_lr = lr_at(epoch, lr=lr, milestones=milestones, decay=lr_decay)
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
