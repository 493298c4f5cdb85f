"""Rank 0 of a tensor-parallel model: it checks the model splits, starts (or joins) the other
ranks, and holds its own share and the channel its engine sends each step through. Rank 0 runs
the scheduler, the KV cache's bookkeeping and the sampler, as in a single process."""
from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from quill.config import ModelConfig
from quill.distributed.channel import StepChannel
from quill.distributed.group import GroupAddress, host_local_store, join_group, launched_rank, rank_device
from quill.distributed.model import build_shard, read_for_sharding
from quill.distributed.shard import ShardPlan
from quill.distributed.worker import WorkerSpec, run_worker, spawned_worker
from quill.errors import InvalidRequestError

log = logging.getLogger("quill")


@dataclass
class TensorParallel:
    model: nn.Module  # rank 0's share
    config: ModelConfig  # the whole model's: what the engine plans with
    channel: StepChannel
    processes: mp.ProcessContext | None  # the workers spawned here; None under a launcher
    threads_before: int  # this process's torch threads before it took its share of the cores
    _closed: bool = field(default=False, repr=False)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the other ranks and leave the group (once; also at exit)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.channel.broken is None:
                self.channel.stop()
            # The workers leave the group after STOP; rank 0 hosts the group's store, so it waits
            # for them before leaving itself. Workers a broken step left waiting in a collective
            # (see channel.py) are ended at once. Ranks a launcher started are not this process's
            # to end: rank 0 leaving the group should fail their collective (not tested).
            _stop(self.processes, timeout if self.channel.broken is None else 0.0)
        finally:
            dist.destroy_process_group()
            _stop(self.processes, 0.0)
            torch.set_num_threads(self.threads_before)


def start_tensor_parallel(path: str | Path, size: int, dtype: torch.dtype, device: torch.device, *,
                          dequantize: bool = False) -> TensorParallel:
    """Rank 0's share of the model at `path`, split `size` ways. Spawns the other ranks as local
    processes, unless a launcher (torchrun) started them: then this must be its rank 0."""
    if size < 2:
        raise InvalidRequestError(f"tensor_parallel_size is the number of processes to split the model over "
                                  f"(2 or more; 1 runs it whole), got {size}", param="tensor_parallel_size")
    launched = launched_rank(size)
    if launched not in (None, 0):
        raise InvalidRequestError(f"this is rank {launched}; ranks past 0 run `run_worker` (as `quill run` and "
                                  "`quill serve` do under a launcher)", param="tensor_parallel_size")
    device = rank_device(device, 0)
    checkpoint = read_for_sharding(path, dtype, device, dequantize)
    plan = ShardPlan(checkpoint.config, 0, size)
    plan.check(checkpoint.tensors)  # before any process starts
    processes, store, threads_before = None, None, torch.get_num_threads()
    if launched is None:
        store = host_local_store(size)
        address = GroupAddress("127.0.0.1", store.port)
        threads = max(1, len(os.sched_getaffinity(0)) // size)  # the ranks share this machine's cores
        spec = WorkerSpec(str(path), size, str(dtype).removeprefix("torch."), device.type, dequantize, threads)
        processes = mp.start_processes(spawned_worker, args=(spec, address), nprocs=size - 1, join=False,
                                       start_method="spawn")
        torch.set_num_threads(threads)
    try:
        join_group(0, size, device, store)
        model = build_shard(checkpoint, plan, dtype, device)
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        _stop(processes, 0.0)
        torch.set_num_threads(threads_before)
        raise
    log.info("tensor parallel: %d ranks (%s), rank 0 holds %d of %d attention heads",
             size, dist.get_backend(), plan.local_config().num_heads, checkpoint.config.num_heads)
    parallel = TensorParallel(model, checkpoint.config, StepChannel(device), processes, threads_before)
    atexit.register(parallel.close)
    return parallel


def _stop(processes: mp.ProcessContext | None, timeout: float) -> None:
    if processes is None:
        return
    for process in processes.processes:
        process.join(timeout)
        if process.is_alive():
            process.terminate()
            process.join(10)
        if process.is_alive():  # SIGTERM blocked (a rank started inside a Ray replica: deploy/launch.py)
            process.kill()
            process.join()


def serve_as_worker(path: str | Path, size: int, dtype: torch.dtype, device: torch.device, *,
                    dequantize: bool = False) -> bool:
    """Under a launcher, on a rank past 0: serve rank 0's steps until it stops, then return True.
    Return False at once where this process is rank 0 or no launcher started it."""
    rank = launched_rank(size)
    if not rank:
        return False
    threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    spec = WorkerSpec(str(path), size, str(dtype).removeprefix("torch."), device.type, dequantize, threads)
    run_worker(spec, rank, None)
    return True
