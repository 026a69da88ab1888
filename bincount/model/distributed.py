"""Data-parallel training across processes: the little torch.distributed needs.

The same training code runs in one process or in several. Launchers (torchrun,
Metaflow's ``@torchrun``, SageMaker's ``torch_distributed``) start one process
per worker and describe the group in the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
:func:`init_from_env` joins it. Each process then reads only its own share of
the data (whole shards of photos, see ``bincount.model.train.rank_share``, or
:func:`shard`), and the results are gathered (:func:`all_gather`) and put back in
order by photo id.

An entry point under torchrun: call ``bincount.model.train.train_on_split`` (it joins
the group), let rank 0 (``world()[0] == 0``) write what should be written
once, then call :func:`cleanup`.
"""

from __future__ import annotations

import os
from datetime import timedelta

# A collective that waits longer than this fails instead of hanging forever
# (a crashed or stuck peer). Ranks only wait for each other's imbalance in
# decoding and in an epoch, which is seconds, so this is generous.
TIMEOUT = timedelta(minutes=10)


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when no process group is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> bool:
    """Join the process group the launcher described in the environment; True if there is
    more than one process. nccl on GPU (each process on the GPU of its ``LOCAL_RANK``), gloo on CPU.
    Safe to call again: an initialised group is kept."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method="env://",
                            timeout=TIMEOUT)
    return True


def cleanup() -> None:
    """Leave the process group, if this process is in one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items, rank: int, world_size: int):
    """This rank's share: every ``world_size``-th item from ``rank`` on. Shares differ in size
    by at most one item and each keeps the order (and so the class mix) of ``items``."""
    return items[rank::world_size]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over all ranks; every rank gets the result."""
    import torch
    import torch.distributed as dist

    # nccl only reduces tensors on this process's GPU.
    device = torch.cuda.current_device() if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_gather(obj) -> list:
    """Every rank's ``obj`` (any picklable object), in rank order, on every rank."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(model) -> None:
    """Give every rank rank 0's buffers (batch-norm running statistics). DDP syncs them before
    each training forward, but each rank's last batch then updates its own copy; after this
    every rank evaluates, and saves, the same model."""
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
