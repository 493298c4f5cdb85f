"""Memory the operator can predict: the KV cache is sized from a budget that nothing overrides, a
context window the budget cannot hold is shortened (or refused when the operator chose it), and a
model file's metadata is checked against sanity limits before anything is sized from it."""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from engine_helpers import load_model
from quill.config import EngineConfig
from quill.engine.engine import Engine
from quill.engine.kv_cache import DEFAULT_KV_CACHE_BYTES
from quill.engine.runner import kv_bytes_per_token
from quill.errors import InvalidRequestError, ModelLoadError
from quill.model_limits import MODEL_LIMITS, check_model_limits
from quill.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    return load_model(tiny_model_dir("llama"))  # float32 network, its config (a 256-token window)


def _engine(tiny_llama, window: int | None = None, **options) -> Engine:
    model, config = tiny_llama
    if window is not None:
        config = dataclasses.replace(config, max_position_embeddings=window)
    return Engine(model, config, None, EngineConfig(dtype="float32", **options))


def _cache_bytes(engine: Engine) -> int:
    per_token = kv_bytes_per_token(engine.model_config, torch.float32)
    return engine.kv_cache.num_blocks * engine.kv_cache.block_size * per_token


# ------------------------------------------------------------------------ the KV-cache budget


def test_default_kv_cache_never_exceeds_its_budget_however_long_the_window(tiny_llama, caplog):
    """A 4M-token window would need 3 GiB of this model's cache; the default budget is 1 GiB, so the
    window is shortened to what the budget holds, with a warning (it used to be "at least one
    full-length sequence", which overrode the cap)."""
    with caplog.at_level(logging.WARNING, logger="quill.engine"):
        engine = _engine(tiny_llama, window=1 << 22)
    assert _cache_bytes(engine) <= DEFAULT_KV_CACHE_BYTES
    capacity = engine.kv_cache.num_blocks * engine.kv_cache.block_size
    assert engine.max_model_len == engine.limits().max_model_len == capacity < 1 << 22
    assert engine.limits().kv_cache_bytes == _cache_bytes(engine)
    assert any("shortened" in r.getMessage() for r in caplog.records)


def test_explicit_budget_shortens_the_models_window(tiny_llama, caplog):
    per_token = kv_bytes_per_token(tiny_llama[1], torch.float32)
    with caplog.at_level(logging.WARNING, logger="quill.engine"):
        engine = _engine(tiny_llama, kv_cache_memory=per_token * 16 * 4)  # 4 blocks: 64 of the 256 tokens
    assert (engine.kv_cache.num_blocks, engine.max_model_len) == (4, 64)
    assert "256" in caplog.text and "64" in caplog.text
    engine.add_request([1] * 60, SamplingParams(max_tokens=4))  # the shortened window is what is checked
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request([1] * 64, SamplingParams(max_tokens=1))
    assert info.value.code == "context_length_exceeded"


def test_a_chosen_window_the_budget_cannot_hold_is_an_error(tiny_llama):
    per_token = kv_bytes_per_token(tiny_llama[1], torch.float32)
    with pytest.raises(InvalidRequestError) as info:
        _engine(tiny_llama, max_model_len=128, kv_cache_memory=per_token * 16 * 4)
    assert info.value.param == "max_model_len" and "--kv-cache-memory" in info.value.message
    with pytest.raises(InvalidRequestError) as info:  # less than one block
        _engine(tiny_llama, kv_cache_memory=per_token)
    assert info.value.param == "kv_cache_memory"


def test_small_windows_keep_the_small_default(tiny_llama):
    """The default never takes more than every sequence slot at full length needs."""
    engine = _engine(tiny_llama, max_num_seqs=4)
    per_token = kv_bytes_per_token(tiny_llama[1], torch.float32)
    assert _cache_bytes(engine) == per_token * 256 * 4 and engine.max_model_len == 256
    assert engine.kv_plan.default_budget and not engine.kv_plan.shortened
    assert "1.0 sequences" not in engine.kv_plan.describe() and "4.0 sequences of 256 tokens" in engine.kv_plan.describe()


# --------------------------------------------------------------------- metadata sanity limits


def test_model_limits_name_the_value_out_of_range():
    check_model_limits({"max_position_embeddings": 8192, "vocab_size": 49152, "sliding_window": None})
    for name, value in (("max_position_embeddings", 0xFFFFFFFF), ("num_layers", 0), ("vocab_size", -1),
                        ("hidden_size", 1 << 40), ("head_dim", 2.5), ("num_heads", True)):
        with pytest.raises(ValueError, match=name):
            check_model_limits({name: value})
    assert check_model_limits({name: high for name, high in MODEL_LIMITS.items()}) is None


def _patched_hf_dir(source: Path, tmp_path: Path, **changes) -> Path:
    target = tmp_path / "patched"
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    return target


@pytest.mark.parametrize("changes", [{"max_position_embeddings": 0xFFFFFFFF}, {"num_hidden_layers": 1 << 31},
                                     {"vocab_size": 1 << 40}])
def test_corrupt_hf_config_is_refused_before_anything_is_sized(tiny_model_dir, tmp_path, changes):
    from quill.models.loader import load_checkpoint

    path = _patched_hf_dir(tiny_model_dir("llama"), tmp_path, **changes)
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_checkpoint(path)
    assert time.perf_counter() - started < 5
    assert "config.json" in str(info.value) and "corrupt" in str(info.value)


# A child process loads a model and reports how long the load took and its peak resident memory;
# the parent kills it if its memory runs away (the old behaviour: 15.5 GB in 36 s).
_LOAD_AND_MEASURE = textwrap.dedent("""
    import json, sys, time
    import torch
    from quill import LLM
    from quill.engine.runner import kv_bytes_per_token
    from quill.errors import ModelLoadError
    started = time.perf_counter()
    try:
        llm = LLM(sys.argv[1])
        engine = llm.engine
        per_token = kv_bytes_per_token(llm.config, torch.float16)
        outcome = {"max_model_len": engine.max_model_len,
                   "kv_bytes": engine.kv_cache.num_blocks * engine.kv_cache.block_size * per_token}
    except ModelLoadError as exc:
        outcome = {"error": str(exc)}
    outcome["seconds"] = time.perf_counter() - started
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent, so a child
    # of a 2 GB pytest process reported 2 GB before it loaded anything.
    with open("/proc/self/status") as status:
        outcome["peak_rss"] = next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmHWM:"))
    print(json.dumps(outcome))
""")
_RSS_CEILING = 1 << 30


def _load_in_child(path: Path, timeout: float = 120) -> dict:
    child = subprocess.Popen([sys.executable, "-c", _LOAD_AND_MEASURE, str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        process = psutil.Process(child.pid)
        while child.poll() is None:
            try:
                rss = process.memory_info().rss
            except psutil.NoSuchProcess:
                break
            assert rss < 2 * _RSS_CEILING, f"loading {path.name} took {rss / 2**30:.1f} GiB and was still growing"
            assert time.monotonic() < deadline, f"loading {path.name} did not end in {timeout} s"
            time.sleep(0.05)
        out, err = child.communicate()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def _patched_gguf(source: Path, tmp_path: Path, context_length: int) -> Path:
    """A copy of a llama-architecture GGUF with `llama.context_length` (a uint32) set."""
    target = tmp_path / f"context-{context_length:x}.gguf"
    shutil.copyfile(source, target)
    key = b"llama.context_length"
    with open(target, "r+b") as f:
        head = f.read(1 << 20)
        at = head.find(struct.pack("<Q", len(key)) + key) + 8 + len(key)
        assert at > 8 + len(key) and struct.unpack_from("<I", head, at)[0] == 4  # GGUF type 4: uint32
        f.seek(at + 4)
        f.write(struct.pack("<I", context_length))
    return target


@pytest.mark.real_model
def test_gguf_with_an_impossible_context_length_is_refused_at_once(smollm2_gguf, tmp_path):
    result = _load_in_child(_patched_gguf(smollm2_gguf, tmp_path, 0xFFFFFFFF))
    assert "error" in result, result
    assert "context length" in result["error"] and "4294967295" in result["error"] and ".gguf" in result["error"]
    assert result["seconds"] < 1.0 and result["peak_rss"] < _RSS_CEILING, result


@pytest.mark.real_model
def test_gguf_with_a_long_context_loads_within_the_default_budget(smollm2_gguf, tmp_path):
    """A plausible 1M-token window (a real long-context model) needs 24 GB of SmolLM2's cache: the
    model loads with its window shortened to the default 1 GiB budget."""
    result = _load_in_child(_patched_gguf(smollm2_gguf, tmp_path, 1 << 20))
    assert "error" not in result, result
    assert result["kv_bytes"] <= DEFAULT_KV_CACHE_BYTES and 8192 < result["max_model_len"] < 1 << 20
    assert result["peak_rss"] < _RSS_CEILING, result
