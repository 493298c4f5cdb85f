"""The process group of a tensor-parallel model: one process per rank, on one machine (spawned
here) or on several (launched by torchrun or the like, which set RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT). gloo on CPUs, NCCL on GPUs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from quill.errors import InvalidRequestError

# The ranks past 0 wait in a broadcast for rank 0's next step, which an idle server may not send
# for days; PyTorch's default 30-minute collective timeout would kill them.
IDLE_TIMEOUT = timedelta(days=365)


@dataclass(frozen=True)
class GroupAddress:
    """Where the ranks meet: the host and port of rank 0's store."""

    host: str
    port: int


def host_local_store(size: int) -> dist.TCPStore:
    """Rank 0's store on a loopback port the kernel picks as it binds: no window in which another
    process could take a port chosen beforehand."""
    return dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=IDLE_TIMEOUT, wait_for_workers=False)


def launched_rank(size: int) -> int | None:
    """This process's rank when a launcher set RANK and WORLD_SIZE (None: spawn the ranks here)."""
    if "RANK" not in os.environ:
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != size:
        raise InvalidRequestError(f"--tensor-parallel-size {size} does not match WORLD_SIZE {world}",
                                  param="tensor_parallel_size")
    return int(os.environ["RANK"])


def rank_device(device: torch.device, rank: int) -> torch.device:
    """One GPU per rank: rank r of a machine on cuda:LOCAL_RANK (or cuda:r when spawned here)."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))


def join_group(rank: int, size: int, device: torch.device, store: dist.Store | GroupAddress | None) -> None:
    """Join the group as `rank`: through rank 0's `store` (or its address), or with None from the
    launcher's environment (env://)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if isinstance(store, GroupAddress):
        store = dist.TCPStore(store.host, store.port, size, is_master=False, timeout=IDLE_TIMEOUT)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store,
                            init_method="env://" if store is None else None, rank=rank, world_size=size,
                            timeout=IDLE_TIMEOUT)
