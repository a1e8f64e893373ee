"""File-system helpers every layer uses: atomic writes, what an output may replace, file hashes.

Writes go to a temp file in the same folder, are flushed and fsync'ed, then `os.replace`d over the
target: a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

from slimctl.errors import SlimctlError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would make results private to their writer
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory


def check_output(path: Path, *, force: bool, option: str = "-o", suffix: str | None = None) -> None:
    """Refuse, in one line, to write `path` where the command would destroy what it does not own:
    an existing file without --force, a folder, anything but a regular file (a device, a FIFO, a
    socket) even with --force, or (with `suffix`) a name of another kind than the command writes."""
    if suffix is not None and path.suffix.lower() != suffix:
        raise SlimctlError(f"{option} {path}: the command writes a {suffix} file; name it *{suffix}")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SlimctlError(f"{option} {path}: cannot check it ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        raise SlimctlError(f"{option} {path} is a folder; name a file inside it (e.g. {path / 'out'}{suffix or ''})")
    if not stat.S_ISREG(mode):
        raise SlimctlError(f"{option} {path} is not a regular file (a device, pipe or socket); it is never replaced")
    if not force:
        raise SlimctlError(f"{path} already exists; pass --force to replace it or {option} to write elsewhere")


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):  # 1 MiB at a time
            digest.update(chunk)
    return digest.hexdigest()
