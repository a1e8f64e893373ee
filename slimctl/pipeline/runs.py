"""A training run's folder: what may go into it, what is written beside its config, how it resumes.

The training stages (slimctl.pipeline.training) call these before they train: a run never mixes
into a folder that holds another run's checkpoints, records the code it ran (provenance), and
resumes only the recipe and parent it was started with.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from slimctl._version import __version__
from slimctl.errors import SlimctlError
from slimctl.io.checkpoint import load_checkpoint, model_from_checkpoint
from slimctl.io.config import Config
from slimctl.train import distributed

CHECKPOINT_NAMES = ("last.pt", "best.pt")


def provenance() -> dict[str, Any]:
    """Versions and git commit written beside a run's config, so a result can be traced to code."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"slimctl": __version__, "torch": str(torch.__version__), "git_commit": commit}


def prepare_run_dir(run_dir: Path, *, resume: bool, force: bool) -> None:
    """Refuse to mix a new run into a folder that holds another run's checkpoints (nothing is created here)."""
    existing = [n for n in CHECKPOINT_NAMES if (run_dir / n).exists()]
    if resume:
        if not (run_dir / "last.pt").exists():
            raise SlimctlError(f"--resume: {run_dir / 'last.pt'} does not exist; start the run without --resume")
    elif existing and not force:
        raise SlimctlError(
            f"{run_dir} already holds {', '.join(existing)}; pass --resume to continue that run "
            "or --force to start over (its checkpoints will be replaced)"
        )


LOCK_NAME = ".lock"


def hold_run_dir(run_dir: Path) -> Callable[[], None]:
    """Hold `run_dir` for this process: an exclusive lock (flock) on `run_dir/.lock`, which names
    the holder; the function returned releases it and removes the file. The kernel drops the lock
    when its process dies, so the file a killed run leaves is free and taken over. A folder another
    live run holds is a SlimctlError, --force or not: two writers would mix their checkpoints."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): unguarded
        return lambda: None
    path = run_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise SlimctlError(f"{run_dir} is in use by another run ({holder or 'another process'}); wait for it "
                               "to end, or write elsewhere with -o") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # the file at the path, not one a finishing holder has just removed
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)

    def release() -> None:
        path.unlink(missing_ok=True)  # while still held: a newcomer then makes a fresh file
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    return release


def rank0_log(log: Callable[[str], None]) -> Callable[[str], None]:
    """Under torchrun only rank 0 speaks: every other rank's lines would repeat its own."""
    return log if distributed.from_env().is_main else (lambda *args: None)


def resumed(cfg: Config, run_dir: Path, parent: Path | None, parent_sha256: str | None) -> tuple[nn.Module, dict]:
    """The model and resume state in `run_dir/last.pt`, after checking it continues this recipe and parent."""
    last = load_checkpoint(run_dir / "last.pt")
    if not last.get("resume"):
        raise SlimctlError(f"{run_dir / 'last.pt'} holds no resume state (the run finished or was not resumable)")
    _check_same_recipe(last.get("config"), cfg.to_dict(), run_dir)
    recorded = (last.get("parent") or {}).get("sha256")
    if parent is not None and recorded and recorded != parent_sha256:
        raise SlimctlError(
            f"--resume: {run_dir} fine-tunes another checkpoint than {parent} (it changed since); "
            "start over with --force"
        )
    return model_from_checkpoint(last, source=str(run_dir / "last.pt")), last["resume"]


# Keys a resumed run may change: extending the schedule is the usual reason to resume a finished run.
RESUMABLE_CHANGES = {"train.epochs", "finetune.epochs", "log.tensorboard"}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_same_recipe(recorded: Any, current: dict[str, Any], run_dir: Path) -> None:
    """--resume with other settings would silently mix two recipes in one run: refuse."""
    if not isinstance(recorded, dict):
        return
    old, new = _flatten(recorded), _flatten(current)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES]
    if changed:
        detail = ", ".join(f"{k} ({old.get(k)!r} → {new.get(k)!r})" for k in changed[:4])
        raise SlimctlError(
            f"--resume: the config differs from the one {run_dir} was started with: {detail}; "
            "resume with the same config, or start a new run with --force"
        )
