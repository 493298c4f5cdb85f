"""Where Quill keeps its files on disk. Dependency-free, so that every layer can ask, down to the
kernel builds (which must not import the model hub to learn where they go)."""
from __future__ import annotations

import os
from pathlib import Path


def quill_home() -> Path:
    """`$QUILL_HOME`, or `~/.cache/quill`: pulled models under `models/`, built C kernels under `kernels/`."""
    return Path(os.environ.get("QUILL_HOME") or "~/.cache/quill").expanduser()
