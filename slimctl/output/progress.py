"""Progress of a training run: rich's bar on a terminal, plain lines everywhere else.

Both take the same two calls from the training loop (`slimctl.train.EpochBar`):
`start_epoch(epoch, epochs, steps, step, images, done)` and `advance(images, mean_loss)`, where
`mean_loss()` reads the epoch's running loss from the device; it is called only when a line is
printed, so it costs one host sync per line, never one per step.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from slimctl.errors import SlimctlError

DEFAULT_SECONDS = 30.0  # a plain line at least this often (seconds)…
DEFAULT_FRACTION = 0.1  # …or every 10% of an epoch,
MIN_SECONDS = 5.0  # but never more often than this by default (seconds): short runs stay calm


class Every(NamedTuple):
    """A cadence of progress lines: exactly one of the three is set."""

    steps: int | None = None
    seconds: float | None = None
    fraction: float | None = None  # of an epoch, in (0, 1]


def parse_every(text: str) -> Every:
    """`--log-every`: "50" → every 50 steps, "30s" → every 30 seconds, "5%" → every 5% of an epoch."""
    value = text.strip().lower()
    try:
        if value.endswith("s"):
            seconds = float(value[:-1])
            if seconds > 0:
                return Every(seconds=seconds)
        elif value.endswith("%"):
            percent = float(value[:-1])
            if 0 < percent <= 100:
                return Every(fraction=percent / 100)
        elif int(value) >= 1:
            return Every(steps=int(value))
    except ValueError:
        pass
    raise SlimctlError("--log-every expects a number of steps (e.g. 50), seconds (e.g. 30s) or a percentage "
                       f"of an epoch (e.g. 5%), got {text!r}")


def duration(seconds: float) -> str:
    """h:mm:ss (or m:ss under an hour)."""
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class RunClock:
    """Images/s since this call began, and what it implies for the epoch's and the run's end
    (training time only: evaluation is not counted)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started: float | None = None  # the first epoch's start: model building and data loading excluded
        self.images = 0  # trained since `started`
        self.epoch = self.epochs = self.total = self.done = 0

    def start_epoch(self, epoch: int, epochs: int, images: int, done: int) -> None:
        self.epoch, self.epochs, self.total, self.done = epoch, epochs, images, done
        if self.started is None:
            self.started = self.clock()

    def advance(self, images: int) -> None:
        self.images += images
        self.done += images

    def rate(self) -> float:
        """Images per second (0 before anything was trained)."""
        elapsed = 0.0 if self.started is None else self.clock() - self.started
        return self.images / elapsed if elapsed > 0 else 0.0

    def eta(self) -> tuple[float, float]:
        """Seconds left in (this epoch, the whole run)."""
        rate = self.rate() or float("inf")
        epoch_left = max(0, self.total - self.done) / rate
        return epoch_left, epoch_left + (self.epochs - self.epoch - 1) * self.total / rate


class RichProgress:
    """On a terminal: the per-batch bar with the epoch's ETA and the run's; it vanishes when the
    epoch's line is printed."""

    def __init__(self, console: Console, clock: Callable[[], float] = time.monotonic) -> None:
        self.run = RunClock(clock)
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("run ETA {task.fields[run_eta]}"), console=console, transient=True,
        )
        self.task = self.bar.add_task("train", total=None, run_eta="-")

    def __enter__(self) -> RichProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def start_epoch(self, epoch: int, epochs: int, *, steps: int, step: int, images: int, done: int) -> None:
        self.run.start_epoch(epoch, epochs, images, done)
        self.bar.reset(self.task, total=images, completed=done, description=f"epoch {epoch + 1}/{epochs}")

    def advance(self, images: int, mean_loss: Callable[[], float]) -> None:
        self.run.advance(images)
        self.bar.update(self.task, advance=images, run_eta=duration(self.run.eta()[1]))


class LineProgress:
    """Without a terminal (a log file, nohup, a job scheduler, CI), or with --log-every: one plain
    line at a steady cadence: every `steps` steps, every `seconds`, every `fraction` of an epoch, or
    by default every 30 s or 10% of an epoch, whichever comes first (but at most one per 5 s)."""

    def __init__(self, write: Callable[[str], None], *, steps: int | None = None, seconds: float | None = None,
                 fraction: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.write, self.every_steps, self.every_seconds, self.every_fraction = write, steps, seconds, fraction
        self.clock = clock
        self.run = RunClock(clock)
        self.last = clock()  # when the last line was printed
        self.step = self.steps = self.last_step = 0

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def start_epoch(self, epoch: int, epochs: int, *, steps: int, step: int, images: int, done: int) -> None:
        self.run.start_epoch(epoch, epochs, images, done)
        self.step, self.steps, self.last_step = step, steps, step

    def _due(self) -> bool:
        since = self.clock() - self.last
        if self.every_steps is not None:
            return self.step - self.last_step >= self.every_steps
        if self.every_seconds is not None:
            return since >= self.every_seconds
        if self.every_fraction is not None:
            return self.step - self.last_step >= max(1, round(self.steps * self.every_fraction))
        tenth = max(1, round(self.steps * DEFAULT_FRACTION))
        return since >= DEFAULT_SECONDS or (self.step - self.last_step >= tenth and since >= MIN_SECONDS)

    def advance(self, images: int, mean_loss: Callable[[], float]) -> None:
        self.run.advance(images)
        self.step += 1
        if not self._due() or self.step == self.steps:  # the epoch's own line follows the last step
            return
        epoch_eta, run_eta = self.run.eta()
        self.write(f"epoch {self.run.epoch + 1}/{self.run.epochs}  step {self.step}/{self.steps}  "
                   f"loss {mean_loss():.4f}  {self.run.rate():.0f} img/s  "
                   f"ETA epoch {duration(epoch_eta)}, run {duration(run_eta)}")
        self.last, self.last_step = self.clock(), self.step


def reporter(console: Console, log_every: str | None) -> RichProgress | LineProgress:
    """Rich's bar on a terminal; plain lines without one, or at the cadence `--log-every` asks for."""
    if log_every is None and console.is_terminal:
        return RichProgress(console)
    every = parse_every(log_every) if log_every is not None else Every()
    return LineProgress(lambda line: console.print(line, markup=False, highlight=False), **every._asdict())
