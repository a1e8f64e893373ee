"""The learning-rate schedule: integer-epoch milestones, the lr per epoch, its sum over a run (the L1 budget's denominator)."""

from __future__ import annotations


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
    L1 budget multiplies λ by (`slimctl.core.sparsity.l1_budget`). In closed form, one term per
    stretch between milestones, so a mistyped epoch count costs nothing here."""
    bounds = [0, *(min(m, epochs) for m in sorted(milestones)), epochs]
    return steps_per_epoch * sum(lr * decay ** k * (bounds[k + 1] - bounds[k]) for k in range(len(bounds) - 1))
