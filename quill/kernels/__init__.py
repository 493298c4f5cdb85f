"""Small C kernels for the steps where PyTorch's per-call overhead dominates, built on first use.

Each kernel is one C file next to this module, compiled with the system C compiler for this CPU
into `$QUILL_HOME/kernels/` and called through ctypes (which releases the GIL). Where no compiler
is found or the build fails, `function` returns None, the log says why once, and the layers keep
their PyTorch path: the kernels make Quill faster, never required. `QUILL_KERNELS=0` turns them
off (the tests use it to compare both paths).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from quill.paths import quill_home

log = logging.getLogger("quill")

SOURCE_DIR = Path(__file__).parent
# -march=native: the library is built where it runs, so it may use every instruction this CPU has.
# OpenMP resolves to the runtime PyTorch has already loaded, so both share one thread pool.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
# Libraries linked from several sources' objects: the fused decoder calls the other kernels.
LINKED = {"matmul": ("matmul", "int4_q8"),
          "decoder": ("decoder", "matmul", "int4_q8", "rms_norm", "rotary", "store_kv", "decode_attention", "activation")}


# ctypes types for `function`'s argtypes and restype
POINTER, INT32, INT64, FLOAT = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float


def function(name: str, argtypes: list, restype=None, *, source: str | None = None):
    """The C function `name`, from `source`.c (default `name`.c), typed, or None where kernels are
    off or cannot be built here. Pass tensors as their `data_ptr()`."""
    library = _load(source or name) if os.environ.get("QUILL_KERNELS", "1") != "0" else None
    if library is None:
        return None
    kernel = getattr(library, name)
    kernel.argtypes, kernel.restype = argtypes, restype
    return kernel


@functools.cache
def _load(name: str) -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(str(_build(name)))
    except (OSError, subprocess.CalledProcessError) as error:  # no compiler, a failed build, a bad library
        detail = getattr(error, "stderr", None) or error
        log.warning("C kernel %s unavailable, using the PyTorch path: %s", name, str(detail).strip()[:500])
        return None


def _build(name: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile once per source, flags and CPU; later calls find the library in the cache. Each
    source compiles to an object file of its own, which every library that links it shares (the
    fused decoder links the matmul kernel's object: one compilation, the same machine code). The
    tests build variants with `extra_flags` (e.g. without AVX-512) to check the portable paths."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise FileNotFoundError("no C compiler (cc or gcc) on PATH")
    flags = [*FLAGS, *extra_flags]
    variant = "".join("+" + flag.lstrip("-") for flag in extra_flags)
    objects = [_compiled(compiler, source, flags, variant) for source in LINKED.get(name, (name,))]
    key = hashlib.sha256(" ".join(o.name for o in objects).encode()).hexdigest()[:16]
    target = quill_home() / "kernels" / f"{name}{variant}-{key}.so"
    if not target.exists():
        _produce(target, [compiler, *flags, *map(str, objects), "-lm"], name, variant)
        log.info("built C kernel %s -> %s", name, target)
    return target


def _compiled(compiler: str, source: str, flags: list[str], variant: str) -> Path:
    """The object file of `source`.c, compiled on first use; keyed on the source, every header
    (what it may include), the compiler, the flags and the CPU."""
    headers = b"".join(header.read_bytes() for header in sorted(SOURCE_DIR.glob("*.h")))
    code = (SOURCE_DIR / f"{source}.c").read_bytes()
    key = hashlib.sha256(code + headers + " ".join([compiler, *flags, _cpu()]).encode()).hexdigest()[:16]
    target = quill_home() / "kernels" / "objects" / f"{source}{variant}-{key}.o"
    if not target.exists():
        _produce(target, [compiler, *flags, "-c", str(SOURCE_DIR / f"{source}.c")], source, variant)
    return target


def _produce(target: Path, command: list[str], name: str, variant: str) -> None:
    """Run `command` with `-o` beside `target`, then rename: a concurrent process never reads a
    half-written file. Older builds of the same name (other sources, another CPU) go."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run([*command, "-o", str(built)], check=True, capture_output=True, text=True)
        os.replace(built, target)
    for stale in target.parent.glob(f"{name}{variant}-*{target.suffix}"):
        if stale != target:
            stale.unlink(missing_ok=True)


def _cpu() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))
