"""The few torch.distributed calls an evaluation needs, and no-ops in a single process.

``torchrun --nproc-per-node=N lava eval ...`` (or ``accelerate launch``) sets ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK``; lava then joins the process group (NCCL on GPUs, gloo on CPUs),
each rank evaluates every n-th image, and confusion counts are summed with an all-reduce.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str | None = None) -> str | None:
    """Join the process group when launched by torchrun; returns the device this rank should use."""
    if world_size() <= 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks (int64 counts stay exact); ``t`` itself in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    out = t.clone()
    if dist.get_backend() == "nccl":
        out = out.cuda()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
