"""Scale-out over processes with torch.distributed (``torchrun --nproc_per_node=K -m layerif score ...``).

Each rank takes a contiguous shard of the records; per-sample results are
all-gathered in rank order (so they line up with the records), gradient-sized
vectors are all-reduced, and rank 0 writes the outputs. Without a process
group every function here is the identity, so the same code runs in one process.

Devices: a CUDA run joins a ``cpu:gloo,cuda:nccl`` group, a CPU run a gloo
group. Every collective here goes through :func:`comm_device`: the tensor is
copied to the group's device (this rank's GPU under NCCL, the CPU under gloo),
every buffer of the collective is created there, and the result is copied back
to where the caller's tensor lives. So the CPU (gloo) path that the tests run
is, line for line, the path NCCL takes; only the device differs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes; False when not launched so.

    CUDA: this rank's GPU is LOCAL_RANK, and the group is ``cpu:gloo,cuda:nccl``
    (NCCL for GPU tensors, gloo for anything left on the CPU); CPU: gloo.
    """
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return False  # not launched by torchrun (a 1-process torchrun run still joins: its collectives run)
    dist.init_process_group(backend=backend_for(device))
    return True


def backend_for(device: torch.device) -> str:
    """The process-group backend for a run on ``device`` (selects this rank's GPU first on CUDA)."""
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def comm_device() -> torch.device:
    """Where this rank's collectives run: its current GPU when the group has NCCL, else the CPU."""
    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
    """Sum ``t`` over ranks, in place (float64 tensors are reduced as float64), on :func:`comm_device`."""
    if dist.is_available() and dist.is_initialized():
        on = t.to(comm_device())
        dist.all_reduce(on, op=dist.ReduceOp.SUM)
        if on is not t:
            t.copy_(on)
    return t


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's rows [n_r, ...] in rank order: [sum n_r, ...] on every rank.

    Every buffer of the collective is created on :func:`comm_device`; the result comes back on ``t.device``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return t
    size = world()[1]
    device = comm_device()
    local = t.to(device)
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([local.shape[0]], dtype=torch.long, device=device))
    rows = [int(c) for c in torch.cat(counts).cpu()]
    padded = torch.zeros((max(rows), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    parts = [torch.zeros_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:r] for p, r in zip(parts, rows)]).to(t.device)
