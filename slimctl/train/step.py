"""One training step and one epoch: the loss (with distillation), backward, the sparsity subgradient on BN scales, the optimizer; eager or compiled; evaluation."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from slimctl.base.device import autocast
from slimctl.core.sparsity import SparsityTerm
from slimctl.errors import is_out_of_memory
from slimctl.train import distributed


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
    """One optimizer step: forward under autocast, backward, grad(γ) += λ·∂R/∂γ, SGD; eager or compiled.

    `sparsity` is λ of the L1 term, or a `SparsityTerm` (λ and its regularizer: polarization also
    clamps γ after the step).

    Compiled (`mode`, a torch.compile mode): two graphs, the model's forward+backward (AOTAutograd)
    and the update (the λ·sign(γ) foreach op and the SGD step, fused by inductor). Shapes are
    static: a batch of another size than the first (an epoch's last partial batch) runs eager
    rather than recompiling. Compiling is lazy, so a failure shows at a step: then one warning,
    that step is redone eagerly (grads are zeroed first, nothing is lost) and the run continues
    eager. Out of memory is never taken for a compile failure. With fp16's GradScaler the update
    stays eager (its inf check reads a device flag on the host).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, gammas: list[nn.Parameter],
                 sparsity: float | SparsityTerm, device: torch.device, dtype: torch.dtype | None,
                 scaler: torch.amp.GradScaler | None = None, mode: str | None = None,
                 warn: Callable[[str], None] = print, distill: Distill | None = None) -> None:
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.distill = distill  # the teacher runs eager: only the student's graph is compiled
        self.gammas = gammas
        self.term = sparsity if isinstance(sparsity, SparsityTerm) else SparsityTerm(float(sparsity))
        self.sparsity = self.term.sparsity
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
        """grad(γ) += λ·∂R/∂γ, then the optimizer step (no GradScaler), then polarization's clamp."""
        self.term.add_grad(self.gammas)
        self.optimizer.step()
        self.term.after_step(self.gammas)

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
            self.scaler.unscale_(self.optimizer)  # λ·∂R/∂γ must meet unscaled gradients
            self.term.add_grad(self.gammas)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.term.after_step(self.gammas)
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


def make_optimizer(model: nn.Module, *, lr: float, momentum: float, weight_decay: float, device: torch.device,
                   dtype: torch.dtype | None) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler | None]:
    """SGD over every parameter, and a GradScaler when training in fp16."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return optimizer, scaler
