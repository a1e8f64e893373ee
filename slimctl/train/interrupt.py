"""Stopping a run cleanly: SIGINT/SIGTERM set a flag the loop checks at each step (agreed across ranks), and the error that says how to resume."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from slimctl.train import distributed


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
