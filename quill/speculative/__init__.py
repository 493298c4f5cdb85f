"""Speculative decoding: cheap drafters propose tokens, one target forward verifies them all.

- `drafter.py`: the interface (propose up to k tokens per sequence);
- `ngram.py`: prompt lookup, no model; `draft_model.py`: a small model with its own KV cache;
- `verifier.py`: greedy matching and rejection sampling over the target's logits;
- `speculator.py`: what the engine talks to (propose, verify, adaptive draft length, stats).
The scheduler schedules a request's drafts with its last token; the runner turns them into extra
query rows (each attended as a decoding row of its own, so greedy output is bit-identical to plain
decoding); the engine commits the verdict and rolls back the KV of rejected drafts
(`KVCacheManager.trim`).
"""
from __future__ import annotations

import torch

from quill.config import EngineConfig, ModelConfig
from quill.speculative.draft_model import DraftModelDrafter
from quill.speculative.ngram import NgramDrafter
from quill.speculative.speculator import SpeculativeStats, Speculator

__all__ = ["SpeculativeStats", "Speculator", "build_speculator"]


def build_speculator(config: EngineConfig, model_config: ModelConfig, tokenizer, *, num_blocks: int,
                     max_model_len: int, device: torch.device, kv_cache_dtype: torch.dtype,
                     row_block: int | None, int8_activations: bool = False) -> Speculator:
    """The speculator `config.speculative` asks for: "ngram", or a draft model to load on the
    target's device (its KV cache gets as many blocks as the target's, enough to mirror every
    sequence, in the target's cache dtype, its 4-bit layers taking 8-bit activations where the
    target's do)."""
    if config.speculative == "ngram":
        drafter = NgramDrafter()
    else:
        drafter = DraftModelDrafter.load(
            config.speculative, model_config, tokenizer, num_blocks=num_blocks, block_size=config.block_size,
            dtype=getattr(torch, config.dtype), kv_cache_dtype=kv_cache_dtype, device=device,
            int8_activations=int8_activations,
        )
    return Speculator(drafter, config.num_speculative_tokens, max_model_len, adaptive=config.adaptive_speculation,
                      row_block=row_block)
