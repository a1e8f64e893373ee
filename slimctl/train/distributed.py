"""torchrun support: one process per device, DistributedDataParallel, rank 0 writes.

`torchrun --nproc_per_node=N -m slimctl sparse-train …` sets RANK/WORLD_SIZE/LOCAL_RANK; the same
code path then runs with NCCL on CUDA or gloo on CPU. Without torchrun everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from slimctl.base.device import resolve_device
from slimctl.errors import SlimctlError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """The process's place in a torchrun launch (a single process without torchrun)."""
    try:
        return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise SlimctlError("RANK/WORLD_SIZE/LOCAL_RANK must be integers (set by torchrun)") from None


def setup(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group (once) and pick this rank's device: cuda:LOCAL_RANK + NCCL, or CPU + gloo."""
    info = from_env()
    if not info.enabled:
        return info, resolve_device(device_name)
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def teardown(*, clean: bool = True) -> None:
    """Leave the process group. After a clean run every rank first waits for the others at a
    barrier, so no rank tears its communication threads down while a peer still talks to it (that
    race ended some 2-process gloo runs with SIGABRT after the last checkpoint). After a failure
    there is no barrier: the other ranks may never reach it."""
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """In place: each tensor becomes its sum over ranks (metrics: loss sums, correct counts)."""
    if active():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest of every rank's `value` (e.g. the number of a signal only one rank received)."""
    if not active():
        return value
    t = torch.tensor(value, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any: ranks stop together."""
    return bool(max_over_ranks(int(flag), device))


def max_diff_from_rank0(tensors: list[torch.Tensor]) -> float:
    """Largest |x − x on rank 0| over all ranks (0.0 when every rank holds the same values)."""
    if not active():
        return 0.0
    flat = torch.cat([t.detach().float().flatten() for t in tensors])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    diff = (flat - reference).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def barrier() -> None:
    if active():
        dist.barrier()
