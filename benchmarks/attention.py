"""Decode attention on the CPU: the C kernel's time per layer call for a batch of decoding rows.

    python benchmarks/attention.py                       # 16 rows, SmolLM2's heads, 128-1024 keys
    python benchmarks/attention.py --rows 1 --contexts 2048 8192

Each row is a sequence of its own (a decoding step of that many streams), its keys and values in
scattered blocks of a float16 cache (`--cache-dtype`), as the engine's are on the CPU by default. Reports the best of --repeats timings
of --calls calls each, in microseconds per call (one layer of one step), with the host's CPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from quill.hardware import host_description  # noqa: E402
from quill.layers.attention import PagedAttention, SingleQueryRows  # noqa: E402
from quill.table import format_table  # noqa: E402

BLOCK = 16


def time_call(rows: int, context: int, heads: int, kv_heads: int, dim: int, cache_dtype: torch.dtype, calls: int,
              repeats: int) -> float:
    generator = torch.Generator().manual_seed(0)
    blocks_per_row = -(-context // BLOCK)
    num_blocks = rows * blocks_per_row
    attention = PagedAttention(heads, kv_heads, dim, scale=dim ** -0.5)
    attention.bind_cache(num_blocks * BLOCK, cache_dtype, torch.device("cpu"))
    attention.k_cache.copy_(torch.randn(attention.k_cache.shape, generator=generator))
    attention.v_cache.copy_(torch.randn(attention.v_cache.shape, generator=generator))
    order = torch.randperm(num_blocks, generator=generator).tolist()  # blocks scattered, as a busy cache's are
    tables = [order[i * blocks_per_row:(i + 1) * blocks_per_row] for i in range(rows)]
    meta = SingleQueryRows(None, [context - i % BLOCK for i in range(rows)], tables, BLOCK, torch.device("cpu"))
    q = torch.randn(rows, heads, dim, generator=generator)
    for _ in range(calls // 10 + 1):
        attention._attend_single_queries(q, meta)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            attention._attend_single_queries(q, meta)
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[16], help="decoding rows per call")
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 256, 512, 1024], help="keys per row")
    parser.add_argument("--heads", type=int, nargs=3, default=[9, 3, 64], metavar=("HEADS", "KV_HEADS", "DIM"),
                        help="query heads, kv heads, head size (default: SmolLM2's)")
    parser.add_argument("--cache-dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                        help="the KV cache's type (default: float16, the engine's on the CPU)")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cache_dtype = getattr(torch, args.cache_dtype)
    table = [(str(rows), str(context),
              f"{1e6 * time_call(rows, context, *args.heads, cache_dtype, args.calls, args.repeats):.0f}")
             for rows in args.rows for context in args.contexts]
    print(format_table(("rows", "keys per row", "us per call"), table, numeric=True))
    print(f"cache: {args.cache_dtype}; host: {host_description()['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
