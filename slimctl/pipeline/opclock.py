"""The operator clock of `prune --round-to auto`: one convolution or linear layer timed at given shapes,
remembered across runs in the user's cache folder ($XDG_CACHE_HOME/slimctl or ~/.cache/slimctl,
`op_latency.json`), keyed by machine, runtime, batch size, threads, precision and how it was timed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from slimctl.base.device import autocast, resolve_precision
from slimctl.base.files import atomic_write_text
from slimctl.pipeline.bench import median_ms

REPEATS, WARMUP = 15, 3  # timed and untimed calls of one operator

# How operators are timed, part of the cache's key: timings taken another way are not reused.
TIMING = "freed memory kept"


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "slimctl" / "op_latency.json"


@dataclass
class OpClock:
    """Milliseconds of one convolution or linear layer at given shapes, timed under `conditions`
    (on the CPU, torch) and remembered in `path` across runs."""

    conditions: dict[str, Any]
    path: Path = field(default_factory=cache_path)
    timed: int = 0  # shapes timed now (the rest came from the cache)
    entries: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            stored = json.loads(self.path.read_text())
            self.entries = {k: float(v) for k, v in stored.get(self.key_prefix(), {}).items()
                            if isinstance(v, (int, float)) and math.isfinite(v) and v > 0}
        except (OSError, ValueError, AttributeError, TypeError, RecursionError):  # none yet, or unreadable
            self.entries = {}

    def key_prefix(self) -> str:
        c = self.conditions
        return (f"{c['machine']}|{c['runtime']}|batch {c['batch_size']}|{c['threads']} threads|{c['precision']}"
                f"|{TIMING}")

    def ms(self, spec: tuple) -> float:
        key = ",".join(map(str, spec))
        if key not in self.entries:
            self.entries[key] = time_op(spec, batch_size=self.conditions["batch_size"],
                                        precision=self.conditions["precision"])
            self.timed += 1
        return self.entries[key]

    def save(self) -> None:
        try:
            stored = json.loads(self.path.read_text()) if self.path.exists() else {}
            if not isinstance(stored, dict):
                stored = {}
        except (OSError, ValueError, RecursionError):
            stored = {}
        stored[self.key_prefix()] = self.entries
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(stored))
        except OSError:  # a read-only home: the choice stands, only the cache is lost
            pass


def time_op(spec: tuple, *, batch_size: int, precision: str) -> float:
    """Median milliseconds of one op: ("conv", in, out, kh, kw, sh, sw, ph, pw, dh, dw, groups, H, W)
    or ("linear", in, out), on random inputs in inference mode."""
    dtype = resolve_precision(precision, torch.device("cpu"))
    if spec[0] == "linear":
        _, c_in, c_out = spec
        x, w = torch.randn(batch_size, c_in), torch.randn(c_out, c_in)
        def run() -> None:
            F.linear(x, w)
    else:
        _, c_in, c_out, kh, kw, sh, sw, ph, pw, dh, dw, groups, height, width = spec
        x = torch.randn(batch_size, c_in, height, width).contiguous(memory_format=torch.channels_last)
        w = torch.randn(c_out, c_in // groups, kh, kw).contiguous(memory_format=torch.channels_last)
        def run() -> None:
            F.conv2d(x, w, None, (sh, sw), (ph, pw), (dh, dw), groups)
    with torch.inference_mode(), autocast(torch.device("cpu"), dtype):
        return median_ms(run, repeats=REPEATS, warmup=WARMUP, sync=lambda: None)
