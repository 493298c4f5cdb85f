"""The process group of a tensor-parallel model: one process per rank, on one machine (spawned
here) or on several (launched by torchrun or the like, which set RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT). gloo on CPUs, NCCL on GPUs."""
from __future__ import annotations

import os
import socket
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
    """Where the ranks meet: rank 0's address and a free port there."""

    host: str
    port: int

    @staticmethod
    def local() -> GroupAddress:
        with socket.socket() as s:  # a port the kernel says is free now (loopback only)
            s.bind(("127.0.0.1", 0))
            return GroupAddress("127.0.0.1", s.getsockname()[1])


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


def join_group(rank: int, size: int, device: torch.device, address: GroupAddress | None) -> None:
    """Join the group as `rank`; `address` None: from the launcher's environment (env://)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init = "env://" if address is None else f"tcp://{address.host}:{address.port}"
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init, rank=rank,
                            world_size=size, timeout=IDLE_TIMEOUT)
