"""What processor this is: its model and the instruction sets that change Quill's speed or its
arithmetic (kernels pick paths by them; benchmark figures are only comparable between machines of
the same kind); and handing freed memory back to the OS. Dependency-free, so that any layer may ask."""
from __future__ import annotations

import ctypes
import functools
import os
import platform
from pathlib import Path

# The flags that decide kernel paths and speed ratios, as /proc/cpuinfo spells them.
NOTABLE_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                 "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


@functools.cache
def cpu_info() -> dict:
    """{"model": ..., "generation": "family F model M" or "", "cpus": N, "flags": [notable flags
    present], "amx": bool}. Cloud machines often name only the brand ("AMD EPYC"): the family and
    model numbers tell the generations apart (AMD family 25 is Zen 3/4, 26 is Zen 5), and with them
    figures that are not comparable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return parse_cpuinfo(text, platform.processor() or platform.machine()) | {"cpus": os.cpu_count()}


def parse_cpuinfo(text: str, fallback_model: str = "") -> dict:
    """`cpu_info` (less the count) from /proc/cpuinfo's text; the first processor speaks for all."""
    first = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        first.setdefault(key.strip(), value.strip())
    flags = set(first.get("flags", "").split())
    numbered = "cpu family" in first and "model" in first
    generation = f"family {first['cpu family']} model {first['model']}" if numbered else ""
    return {"model": first.get("model name", fallback_model), "generation": generation,
            "flags": [flag for flag in NOTABLE_FLAGS if flag in flags], "amx": "amx_bf16" in flags}


def cpu_summary() -> str:
    """One line for logs and benchmark tables, e.g. "AMD EPYC (family 26 model 2; 2 CPUs; AVX-512 BF16, no AMX)"."""
    info = cpu_info()
    vector = ("AVX-512 BF16" if "avx512_bf16" in info["flags"] else "AVX-512" if "avx512f" in info["flags"]
              else "AVX2" if "avx2" in info["flags"] else "no AVX2")
    generation = f"{info['generation']}; " if info["generation"] else ""
    return f"{info['model']} ({generation}{info['cpus']} CPUs; {vector}, {'AMX' if info['amx'] else 'no AMX'})"


def host_description() -> dict:
    """Where a benchmark ran, for its JSON: the CPU (model, notable flags, AMX or not) and Python."""
    info = cpu_info()
    return {"machine": platform.machine(), "cpu": info["model"], "cpu_generation": info["generation"],
            "cpus": info["cpus"], "cpu_flags": info["flags"], "amx": info["amx"], "summary": cpu_summary(),
            "python": platform.python_version()}


def return_freed_memory_to_os() -> None:
    """Loading and packing weights free hundreds of MB of transient buffers (raw blocks, codes,
    float copies) that glibc keeps in its heap; hand them back so that resident memory is the
    model's own. Measured on SmolLM2 Q4_1: 406-512 MB resident after loading, 285 MB after this;
    once more after packing for the CPU kernels, Gemma 3 270M: 1,098 -> 1,012 MB."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
