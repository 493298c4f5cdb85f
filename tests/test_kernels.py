"""Building the C kernels: cached per source and CPU, and a readable fallback where none builds."""
from __future__ import annotations

import logging
import shutil

import pytest

from quill import kernels
from quill.layers.norm import RMSNorm

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler")


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    monkeypatch.setenv("QUILL_HOME", str(tmp_path))
    kernels._load.cache_clear()
    yield tmp_path
    kernels._load.cache_clear()


@needs_compiler
def test_a_kernel_is_built_once_into_quill_home_replacing_older_builds(fresh_home):
    stale = fresh_home / "kernels" / "rms_norm-0000000000000000.so"
    stale.parent.mkdir()
    stale.write_bytes(b"")
    assert kernels.function("rms_norm", []) is not None
    (built,) = (fresh_home / "kernels").glob("rms_norm-*.so")
    assert built != stale
    stamp = built.stat().st_mtime_ns
    kernels._load.cache_clear()
    assert kernels.function("rms_norm", []) is not None
    assert built.stat().st_mtime_ns == stamp  # found, not rebuilt


def test_without_a_compiler_layers_fall_back_and_the_log_says_why(fresh_home, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(fresh_home / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger="quill"):
        assert kernels.function("rms_norm", []) is None
    assert "C kernel rms_norm unavailable, using the PyTorch path" in caplog.text
    assert RMSNorm(8, 1e-6)._kernel is None


def test_quill_kernels_0_turns_them_off(monkeypatch):
    monkeypatch.setenv("QUILL_KERNELS", "0")
    assert kernels.function("rms_norm", []) is None
