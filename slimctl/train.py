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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from slimctl import distributed
from slimctl.device import autocast
from slimctl.errors import SlimctlError
from slimctl.files import atomic_write_text
from slimctl.sparsity import add_sparsity_grad, gamma_stats


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


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    *,
    gammas: list[nn.Parameter],
    sparsity: float,
    device: torch.device,
    dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None = None,
    state: EpochState | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_step: Callable[[int], None] | None = None,
) -> EpochState:
    """One pass over `loader` (which already skips the `state.steps` batches done before a resume)."""
    state = state or EpochState()
    model.train()
    # Running sums stay on the device: no host sync per step.
    loss_sum = torch.tensor(state.loss_sum, device=device)
    correct = torch.tensor(state.correct, device=device)
    first_bad = torch.tensor(state.first_bad_step, device=device)
    images, steps = state.images, state.steps
    start = time.perf_counter()
    completed = True
    for x, y in loader:
        with autocast(device, dtype):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # λ·sign(γ) must meet unscaled gradients
            add_sparsity_grad(gammas, sparsity)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            add_sparsity_grad(gammas, sparsity)
            optimizer.step()
        loss = loss.detach().float()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), steps, first_bad)
        loss_sum += loss * y.numel()
        correct += (logits.detach().argmax(1) == y).sum()
        images += y.numel()
        steps += 1
        if on_step is not None:
            on_step(y.numel())
        if should_stop():
            completed = steps == len(loader)
            break
    return EpochState(
        loss_sum=float(loss_sum), correct=int(correct), images=images, steps=steps,
        seconds=state.seconds + time.perf_counter() - start, first_bad_step=int(first_bad), completed=completed,
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
) -> dict[str, Any]:
    """Train for `epochs`, evaluating after each; writes metrics.jsonl, last.pt and best.pt.

    `save(path, model, metrics, resume)` writes a checkpoint (the caller knows its metadata).
    `resume_state` (from a last.pt) continues a run exactly where it stopped, mid-epoch included.
    SIGINT/SIGTERM stop at the next step with a resumable last.pt (raises `Interrupted`).
    Under torchrun every rank calls this; only `is_main` (rank 0) writes and logs.
    """
    if not is_main:
        save = write_rows = log = lambda *args: None  # noqa: E731
        progress = None
    else:
        write_rows = write_metrics
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    rows: list[dict[str, Any]] = []
    best_top1 = -1.0
    start_epoch = 0
    partial = None
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        rows = list(resume_state["metrics"])
        best_top1 = float(resume_state["best_top1"])
        start_epoch = int(resume_state["epoch"])
        partial = EpochState(**resume_state["partial"]) if resume_state.get("partial") else None
        if partial is not None and not is_main:  # the saved sums are all ranks' (reduced): count them once
            partial = dataclasses.replace(partial, loss_sum=0.0, correct=0, images=0)
        set_rng_state(resume_state["rng"])

    def resume_info(epoch: int, state: EpochState | None) -> dict[str, Any]:
        return {
            "epoch": epoch,  # epochs fully done
            "partial": None if state is None else dataclasses.asdict(state),  # the epoch in progress
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "best_top1": best_top1,
            "metrics": rows,
            "rng": rng_state(),
        }

    task = progress.add_task("train", total=None) if progress is not None else None
    with graceful_stop() as stop:
        steps_seen = 0
        agreed = {"signum": 0}  # the signal every rank acts on (under torchrun only one may get it)

        def signalled() -> int:
            agreed["signum"] = distributed.max_over_ranks(stop["signum"] or 0, device)
            return agreed["signum"]

        def should_stop() -> bool:
            # Ranks must stop at the same step; agreeing costs a collective, so only every 10 steps.
            nonlocal steps_seen
            steps_seen += 1
            if not distributed.active():
                return signalled() > 0
            return steps_seen % 10 == 0 and signalled() > 0

        for epoch in range(start_epoch, epochs):
            epoch_lr = lr_at(epoch, lr=lr, milestones=milestones, decay=lr_decay)
            for group in optimizer.param_groups:
                group["lr"] = epoch_lr
            train_loader.set_epoch(epoch, start_batch=partial.steps if partial else 0)
            if progress is not None:
                done = partial.images if partial else 0
                progress.reset(task, total=train_loader.num_samples, completed=done,
                               description=f"epoch {epoch + 1}/{epochs}")
            step = (lambda n: progress.advance(task, n)) if progress is not None else None
            state = train_one_epoch(
                model, train_loader, optimizer, gammas=gammas, sparsity=sparsity, device=device, dtype=dtype,
                scaler=scaler, state=partial, should_stop=should_stop, on_step=step,
            )
            partial = None
            # Train metrics over all ranks' samples (ranks finish or stop at the same step).
            state = _summed_over_ranks(state, device)
            if distributed.any_rank(state.first_bad_step >= 0, device):  # every rank stops, not just one
                raise SlimctlError(
                    f"training diverged: the loss became NaN/inf at epoch {epoch + 1}, step {state.first_bad_step + 1} "
                    f"(lr {epoch_lr:g}, sparsity λ {sparsity:g}); {run_dir / 'last.pt'} holds the last good state. "
                    "Lower train.lr or λ and start again"
                )
            if not state.completed:
                save(run_dir / "last.pt", model, {"epoch": epoch}, resume_info(epoch, state))
                raise Interrupted(
                    agreed["signum"],
                    f"stopped at epoch {epoch + 1}, step {state.steps}/{len(train_loader)}; "
                    f"{run_dir / 'last.pt'} holds the run: repeat the command with --resume to continue",
                )
            test_loss, test_top1 = evaluate(model, test_loader, device=device, dtype=dtype)
            row = {
                "epoch": epoch + 1,
                "lr": epoch_lr,
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
            rows.append(row)
            is_best = test_top1 > best_top1
            best_top1 = max(best_top1, test_top1)
            metrics = {"top1": test_top1, "loss": test_loss, "epoch": epoch + 1, "best_top1": best_top1}
            if is_best:
                save(run_dir / "best.pt", model, metrics, None)
            save(run_dir / "last.pt", model, metrics, resume_info(epoch + 1, None))
            write_rows(run_dir / "metrics.jsonl", rows)
            log(
                f"epoch {epoch + 1:>3}/{epochs}  lr {epoch_lr:.4g}  loss {state.loss:.4f}  "
                f"train {state.top1:5.2f}%  test {test_top1:5.2f}%  "
                f"{row['images_per_sec']:.0f} img/s  |γ| {row['gamma_mean_abs']:.4f}"
                + ("  *best" if is_best else "")
            )
            if epoch + 1 < epochs and signalled():
                raise Interrupted(
                    agreed["signum"],
                    f"stopped after epoch {epoch + 1}; {run_dir / 'last.pt'} holds the run: "
                    "repeat the command with --resume to continue",
                )
    return {"best_top1": best_top1, "epochs": rows}
