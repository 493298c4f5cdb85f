"""Which matrix products give a row the same bits whatever else shares the call, on this machine.

For every distinct linear shape of SmolLM2 and Gemma 3, in float32 and bfloat16, it multiplies 64
random rows in calls of 1 to 64 rows and compares each row with the same row computed alone:

- PyTorch's `F.linear` (the BLAS): which row counts agree with one row alone, and which agree with
  blocks of 4 (what Quill relied on until it measured an Intel Xeon with AMX). Informational: this
  is the machine-dependent behaviour Quill does not build on.
- Quill's packed kernel (`quill/kernels/matmul.c`): must agree for every row count, on any CPU.
- The PyTorch fallback (`RowBlockedMatmul`): the block sizes its probe accepts here.

    python benchmarks/invariance_probe.py [--json OUT]

Nothing in it assumes a processor: it records the CPU (model, AVX-512 BF16, AMX) with the results,
and exits non-zero if the kernel ever disagrees.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from quill.hardware import cpu_summary, host_description
from quill.layers.matmul import PackedMatmul, kernel_available, kernel_path, probe_row_blocks
from quill.table import format_table

SHAPES = {"SmolLM2": [(960, 576), (576, 576), (3072, 576), (576, 1536)],
          "Gemma 3": [(1536, 640), (640, 1024), (4096, 640), (640, 2048)]}
MAX_ROWS = 64


def agreeing_row_counts(matmul, x: torch.Tensor) -> list[int]:
    """Row counts n for which the first n rows computed together equal them computed one by one."""
    alone = torch.cat([matmul(x[i:i + 1]) for i in range(len(x))])
    return [n for n in range(1, len(x) + 1) if torch.equal(matmul(x[:n]), alone[:n])]


def compact(counts: list[int]) -> str:
    """[1, 4, 8, 12] -> "1,4,8,12"; a full 1..64 -> "all"."""
    if counts == list(range(1, MAX_ROWS + 1)):
        return "all"
    return ",".join(map(str, counts)) or "none"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows, results, failures = [], [], 0
    for model, shapes in SHAPES.items():
        for out, inp in shapes:
            for dtype in (torch.float32, torch.bfloat16):
                weight = torch.randn(out, inp).to(dtype) * 0.05
                x = torch.randn(MAX_ROWS, inp).to(dtype)
                blas = agreeing_row_counts(lambda t: F.linear(t, weight), x)
                weight32 = weight.float()
                fallback = probe_row_blocks(lambda t: F.linear(t, weight32), inp)
                kernel = agreeing_row_counts(PackedMatmul.dense(weight), x) if kernel_available() else []
                kernel_ok = kernel == list(range(1, MAX_ROWS + 1))
                failures += kernel_available() and not kernel_ok
                name = str(dtype).removeprefix("torch.")
                results.append({"model": model, "shape": [out, inp], "dtype": name, "blas_agreeing_rows": blas,
                                "fallback_blocks": list(fallback), "kernel_invariant": kernel_ok})
                rows.append([model, f"{out}x{inp}", name, compact(blas), "/".join(map(str, fallback)),
                             ("yes" if kernel_ok else "NO") if kernel_available() else "no compiler"])
    print(f"CPU: {cpu_summary()}; packed kernel: {kernel_path() if kernel_available() else 'unavailable'}")
    print(format_table(["model", "out x in", "dtype", "F.linear rows = alone", "fallback blocks", "kernel invariant"],
                       rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"host": host_description(), "results": results}, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
