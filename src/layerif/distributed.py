"""Scale-out over processes with torch.distributed (``torchrun --nproc_per_node=K -m layerif score ...``).

Each rank takes a contiguous shard of the records; per-sample results are
all-gathered in rank order (so they line up with the records), gradient-sized
vectors are all-reduced, and rank 0 writes the outputs. Without a process
group every function here is the identity, so the same code runs in one process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); False when not launched so."""
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def leave() -> None:
    """Leave the process group: a barrier, a moment with the GIL released, then destroy it.

    gloo's worker threads drop their last references to a collective's tensors
    after the collective completes, and need the GIL to do so; a rank that exits
    straight after its last collective can start interpreter finalization first,
    and the worker then aborts the process ("terminate called without an active
    exception", about one run in five). The pause lets them finish.
    """
    dist.barrier()
    time.sleep(0.05)
    dist.destroy_process_group()


@contextmanager
def process_group(device: torch.device) -> Iterator[bool]:
    """Within the context, be a rank of the group torchrun describes (yields whether there is one).

    On an error the group is destroyed without the final barrier, which the
    other ranks, busy in another collective, would never reach.
    """
    joined = init_from_env(device)
    try:
        yield joined
    except BaseException:
        if joined:
            dist.destroy_process_group()
        raise
    if joined:
        leave()


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def shard(items: list) -> slice:
    """This rank's contiguous slice of ``items`` (sizes differ by at most one)."""
    rank, size = world()
    n = len(items)
    return slice(rank * n // size, (rank + 1) * n // size)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks, in place (float64 tensors are reduced as float64)."""
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's rows [n_r, ...] in rank order: [sum n_r, ...] on every rank."""
    rank, size = world()
    if size == 1:
        return t
    device = t.device if dist.get_backend() != "gloo" else torch.device("cpu")
    local = t.to(device)
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([local.shape[0]], device=device))
    peak = int(max(c.item() for c in counts))
    padded = torch.zeros((peak, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    parts = [torch.zeros_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)]).to(t.device)
