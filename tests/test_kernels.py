"""Building the C kernels: cached per source and CPU, and a readable fallback where none builds."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

from quill import kernels
from quill.layers.norm import RMSNorm
from quill.layers.rotary import RotaryEmbedding

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


@needs_compiler
@pytest.mark.parametrize("tokens", [1, 300])  # one decoding token; a prompt (the threaded loop)
def test_rotary_kernel_equals_the_pytorch_expression_bit_for_bit(tokens, monkeypatch):
    heads, kv_heads, dim = 9, 3, 64
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, dim, generator=generator) * 30
    positions = torch.randint(0, 8000, (tokens,), generator=generator)
    rotated = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("QUILL_KERNELS", switch)
        rotary = RotaryEmbedding(dim, 100000.0, None)
        assert (rotary._kernel is None) == (switch == "0")
        rotated[switch] = rotary(positions, qkv[:, :heads + kv_heads])  # a strided view, as attention has
    assert torch.equal(rotated["1"], rotated["0"])


@needs_compiler
def test_a_changed_header_rebuilds_the_kernels_that_may_include_it(fresh_home, tmp_path, monkeypatch):
    sources = tmp_path / "sources"
    shutil.copytree(kernels.SOURCE_DIR, sources, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    monkeypatch.setattr(kernels, "SOURCE_DIR", sources)
    assert kernels.function("rms_norm", []) is not None
    (before,) = (fresh_home / "kernels").glob("rms_norm-*.so")
    with (sources / "half_floats.h").open("a") as header:
        header.write("/* changed */\n")
    kernels._load.cache_clear()
    assert kernels.function("rms_norm", []) is not None
    (after,) = (fresh_home / "kernels").glob("rms_norm-*.so")
    assert after != before
