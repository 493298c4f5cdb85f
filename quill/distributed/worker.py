"""The ranks past 0: each holds its share of the model and its KV heads' cache, and runs every
step rank 0 broadcasts until told to stop. They hold no requests and sample nothing."""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from quill.distributed.channel import CACHE_DTYPES, OPEN, STOP, decode, receive
from quill.distributed.group import GroupAddress, join_group, rank_device
from quill.distributed.model import build_shard, read_for_sharding
from quill.distributed.shard import ShardPlan
from quill.engine.runner import ModelRunner


@dataclass(frozen=True)
class WorkerSpec:
    """What every rank loads the same way (spawn hands it to each worker)."""

    path: str
    size: int
    dtype: str
    device: str
    dequantize: bool
    threads: int


def run_worker(spec: WorkerSpec, rank: int, address: GroupAddress | None) -> None:
    """Join the group as `rank` (from the launcher's environment when `address` is None), load
    this rank's share, and serve rank 0's steps until STOP."""
    torch.set_num_threads(spec.threads)
    device = rank_device(torch.device(spec.device), rank)
    join_group(rank, spec.size, device, address)
    try:
        dtype = getattr(torch, spec.dtype)
        checkpoint = read_for_sharding(spec.path, dtype, device, spec.dequantize)
        plan = ShardPlan(checkpoint.config, rank, spec.size)
        model = build_shard(checkpoint, plan, dtype, device)
        del checkpoint
        command, payload = receive(device)
        if command != OPEN:
            return
        num_blocks, block_size, cache_dtype, int8_activations = payload
        runner = ModelRunner(model, plan.local_config(), num_blocks=num_blocks, block_size=block_size,
                             kv_cache_dtype=CACHE_DTYPES[cache_dtype], device=device,
                             int8_activations=bool(int8_activations))
        while True:
            command, payload = receive(device)
            if command == STOP:
                return
            runner.run(decode(payload))
    finally:
        dist.destroy_process_group()


def spawned_worker(index: int, spec: WorkerSpec, address: GroupAddress) -> None:
    """Entry point of a worker spawned on rank 0's machine (`torch.multiprocessing`): rank index + 1.
    It exits when rank 0's process does, even one killed without a word (which sends no STOP)."""
    _exit_with_parent(os.getppid())
    run_worker(spec, index + 1, address)
    # Stopped and out of the group: end before interpreter teardown. There, Gloo's C++ threads can
    # still hold tensors with Python references and abort the process ("terminate called without an
    # active exception" after a clean STOP, in one test of each of two full CI runs; PyTorch's
    # issue tracker describes the same teardown race). Nothing is left to flush.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _exit_with_parent(parent: int) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="quill-parent-watch").start()
