"""Several processes (``torchrun``, ``accelerate launch``): who we are, joining the group, and the collectives dymu
uses — in one place, so every caller works the same with and without an initialised process group.

Without an initialised group (one process) every helper is the identity: rank 0 of 1, the local value is the
result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Launch:
    """What the launcher put in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), readable before (or
    without) joining a process group — e.g. lmms-eval shards requests by these itself."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def launch_from_env() -> Launch:
    return Launch(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the ``torchrun`` process group if launched by it (gloo on CPU, nccl with CUDA); returns rank, world
    size and this process's device."""
    launch = launch_from_env()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", launch.local_rank) if cuda else torch.device("cpu")
    if launch.world_size > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = rank_and_world()
    return rank, world, device


def all_reduce_mean(values: Tensor) -> Tensor:
    """The mean of ``values`` over processes (a new tensor; ``values`` itself without a group)."""
    if not is_distributed():
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_sum(n: int, device: torch.device | str = "cpu") -> int:
    """The sum of an integer over processes (``device``: where the collective runs, CUDA for nccl)."""
    if not is_distributed():
        return n
    t = torch.tensor([n], dtype=torch.long, device=device)
    dist.all_reduce(t)
    return int(t)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's picklable ``obj``, in rank order (``[obj]`` without a group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_2d(values: Tensor) -> list[Tensor]:
    """Every process's 2-D tensor, in rank order; the shapes may differ between processes (also ``[0, 0]``)."""
    if not is_distributed():
        return [values]
    world = dist.get_world_size()
    shape = torch.tensor(values.shape, dtype=torch.long, device=values.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    rows, cols = [int(s[0]) for s in shapes], [int(s[1]) for s in shapes]
    padded = values.new_zeros((max(rows), max(cols)))  # all_gather needs one shape: pad, then cut each back
    padded[: values.shape[0], : values.shape[1]] = values
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    return [g[:r, :c] for g, r, c in zip(gathered, rows, cols)]
