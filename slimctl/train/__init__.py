"""The training loop shared by sparse-train and finetune: fit / train_one_epoch / evaluate.

Sparsity (the paper's L1 on BN scales) is a subgradient added after `backward()` and before
`step()`: grad(γ) += λ·sign(γ), as one fused foreach op over every ranked BN. With fp16 and a
GradScaler the gradients are unscaled first, so λ is never divided by the loss scale.

The modules, bottom up:

- `schedule`: the learning-rate schedule (integer-epoch milestones, lr per epoch, its sum).
- `distributed`: torchrun — the process group, reductions, only rank 0 speaks.
- `interrupt`: SIGINT/SIGTERM stop a run at a step, resumably.
- `step`: one training step (`TrainStep`: eager or compiled, the L1 subgradient, distillation),
  one epoch (`train_one_epoch`), `evaluate`, the optimizer.
- `loop`: `fit`, a run as named steps (resume, epochs, divergence, records, checkpoints).
"""

from slimctl.train import distributed
from slimctl.train.interrupt import Interrupted, StopSignal, graceful_stop, stopped_after_epoch, stopped_in_epoch
from slimctl.train.loop import (
    EpochBar,
    RunIO,
    RunState,
    Sinks,
    check_divergence,
    epoch_line,
    fit,
    metrics_row,
    rank_sinks,
    restore,
    resume_info,
    rng_state,
    run_epoch,
    save_epoch,
    set_rng_state,
    write_metrics,
)
from slimctl.train.schedule import lr_at, lr_sum, milestone_epochs
from slimctl.train.step import Distill, EpochState, TrainStep, evaluate, make_optimizer, train_one_epoch

__all__ = [
    "Distill", "EpochBar", "EpochState", "Interrupted", "RunIO", "RunState", "Sinks", "StopSignal", "TrainStep",
    "check_divergence", "distributed", "epoch_line", "evaluate", "fit", "graceful_stop", "lr_at", "lr_sum",
    "make_optimizer", "metrics_row", "milestone_epochs", "rank_sinks", "restore", "resume_info", "rng_state",
    "run_epoch", "save_epoch", "set_rng_state", "stopped_after_epoch", "stopped_in_epoch", "train_one_epoch",
    "write_metrics",
]
