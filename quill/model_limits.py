"""Sanity limits on the numbers that describe a model, checked as a checkpoint's metadata is read,
before anything is sized from them.

A model file's header is untrusted input: one corrupt or hostile number (a context length of
0xFFFFFFFF, a billion layers) must not turn into gigabytes of tables or caches. Every limit here is
far above any published model (the largest known value is in the comment), so only a file whose
metadata cannot be right is refused. `ModelConfig` checks itself with `check_model_limits` when it
is built, which every reader does; a reader that sizes something from a value before building it
(a list per layer) checks that value first.
"""
from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

# ModelConfig field -> the largest value accepted (every one must also be at least 1).
MODEL_LIMITS: dict[str, int] = {
    "max_position_embeddings": 1 << 24,  # 10M tokens (Llama 4 Scout)
    "sliding_window": 1 << 24,
    "vocab_size": 1 << 22,  # 262,144 (Gemma 3)
    "hidden_size": 1 << 16,  # 16,384 (Llama 3.1 405B)
    "intermediate_size": 1 << 20,  # 53,248 (Llama 3.1 405B)
    "num_layers": 1 << 10,  # 126 (Llama 3.1 405B)
    "num_heads": 1 << 10,  # 128 (Llama 3.1 405B)
    "num_kv_heads": 1 << 10,
    "head_dim": 1 << 12,  # 256 (Gemma)
}

_WHAT = {"max_position_embeddings": "the context length", "vocab_size": "the vocabulary size",
         "num_layers": "the number of layers", "num_heads": "the number of attention heads",
         "num_kv_heads": "the number of key/value heads"}


def check_model_limits(values: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first value (by its `ModelConfig` name) that is not an integer
    in [1, its limit]; names without a limit, and None (not set), pass."""
    for name, value in values.items():
        high = MODEL_LIMITS.get(name)
        if high is None or value is None:
            continue
        try:
            number = None if isinstance(value, bool) else operator.index(value)
        except TypeError:
            number = None
        if number is None or not 1 <= number <= high:
            what = _WHAT.get(name, name.replace("_", " "))
            raise ValueError(f"{what} ({name}) is {value!r}, outside the [1, {high:,}] Quill accepts: "
                             "the metadata is corrupt")
