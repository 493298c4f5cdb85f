"""Where Quill keeps its files on disk. Dependency-free, so that every layer can ask, down to the
kernel builds (which must not import the model hub to learn where they go)."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def quill_home() -> Path:
    """`$QUILL_HOME`, or `~/.cache/quill`: pulled models under `models/`, built C kernels under `kernels/`."""
    return Path(os.environ.get("QUILL_HOME") or "~/.cache/quill").expanduser()


def unwritable_reason(path: Path) -> str | None:
    """Why a file could not be written at `path` (asked before slow work, which would otherwise end
    in a traceback), or None."""
    if path.is_dir():
        return f"{path} is a directory"
    if not path.parent.is_dir():
        return f"the directory {path.parent} does not exist"
    return None


@contextlib.contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """Where to write the file `path`: `path`.partial beside it, renamed to `path` once the block
    succeeds and removed if it fails, so that an interrupted write never leaves a plausible file."""
    partial = path.with_name(path.name + ".partial")
    try:
        yield partial
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
