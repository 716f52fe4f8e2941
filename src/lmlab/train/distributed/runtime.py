"""The process group, from the environment torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE).

Without torchrun (or with one process) nothing is initialised and every helper here is a
no-op, so the trainer has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lmlab.errors import UserError
from lmlab.runs.device import select_device


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_spec: str) -> tuple[Dist, torch.device]:
    """Join the job torchrun started (nccl on CUDA, gloo on CPU) and pick this rank's device.

    Returns `Dist()` and the plain device when this is a single process.
    """
    if not under_torchrun():
        return Dist(), select_device(device_spec)
    env = Dist(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ["WORLD_SIZE"]),
    )
    device = select_device(device_spec)
    if device.type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"local rank {env.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                "start at most that many processes per node"
            )
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UserError(
            f"multi-process training runs on CUDA (nccl) or CPU (gloo), not {device.type}"
        )
    global _started_here, _control_group
    if not dist.is_initialized():  # a caller may have set up its own process group
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        _started_here = True
    # Small decisions (stop now?) travel over gloo on the CPU, so asking them after every
    # step never waits for the GPU.
    _control_group = dist.new_group(backend="gloo") if backend == "nccl" else None
    return env, device


_started_here = False
_control_group = None


def any_rank(flag: bool, env: Dist) -> bool:
    """True on every rank when `flag` is true on any rank (a CPU all-reduce, no GPU sync)."""
    if not env.enabled:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group)
    return bool(t.item())


def shutdown() -> None:
    """Tear down the process group `init` started (one a caller made is left alone)."""
    global _started_here, _control_group
    if _started_here and dist.is_initialized():
        dist.destroy_process_group()
    _started_here, _control_group = False, None


def broadcast_object(obj: Any, env: Dist) -> Any:
    """Rank 0's `obj` on every rank."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_across_ranks(value: torch.Tensor, env: Dist) -> torch.Tensor:
    """The mean of a tensor over all ranks (a copy; the input is left alone)."""
    if not env.enabled:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return total / env.world_size


def max_across_ranks(value: float, env: Dist, device: torch.device) -> float:
    """The largest of a number over all ranks (its type is kept)."""
    if not env.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return type(value)(t.item())


def barrier(env: Dist) -> None:
    if env.enabled:
        dist.barrier()
