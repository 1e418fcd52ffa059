"""Multi-process runs under torchrun (docs/maths.md §12): `torchrun --nproc_per_node=K -m fewstep sample|train …`.

The process group is set up only when torchrun's WORLD_SIZE > 1 is in the environment, so single-process runs
never touch torch.distributed. Sampling shards the seed list (rank r takes seeds[r::K]); training splits every
batch's seeds into disjoint shares and averages the gradients across ranks (weighted by the shares).
Backend: gloo for CPU tensors, plus nccl for CUDA tensors when CUDA is available ("cpu:gloo,cuda:nccl").
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); joins the process group on first use when WORLD_SIZE > 1, else (0, 1)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
        atexit.register(dist.destroy_process_group)
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def average_gradients(parameters: Iterable[torch.Tensor], weight: float = 1.0) -> None:
    """Replace every gradient by its mean over the ranks weighted by `weight`: Σ_r w_r·g_r / Σ_r w_r. With w_r the
    number of samples of rank r and g_r the gradient of its own mean loss, this is the gradient of the mean loss
    over the whole batch (what one process computes). Missing gradients count as zero so that every rank takes
    part in the same collective calls."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    share = weight / sum_scalar(weight)
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.mul_(share)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def sum_scalar(value: float) -> float:
    """Sum a Python float over the ranks (float64)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t)


def gather_shards(shard: torch.Tensor, total: int) -> torch.Tensor:
    """Reassemble a tensor sharded as rows[rank::world] (rank r holds rows r, r + world, …) on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return shard
    world_size = dist.get_world_size()
    longest = -(-total // world_size)
    padded = torch.zeros(longest, *shard.shape[1:], dtype=shard.dtype)
    padded[: len(shard)] = shard
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    out = torch.empty(total, *shard.shape[1:], dtype=shard.dtype)
    for r, part in enumerate(parts):
        out[r::world_size] = part[: len(range(r, total, world_size))]
    return out
