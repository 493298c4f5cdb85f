"""Helpers for driving the engine and the bare model on tiny test models."""
from __future__ import annotations

from pathlib import Path

import torch

from quill.config import EngineConfig, ModelConfig
from quill.engine.engine import Engine
from quill.engine.runner import kv_cache_dtype
from quill.layers.attention import AttentionMetadata, PagedAttention, PromptSpan
from quill.models.loader import build_model, load_checkpoint
from quill.outputs import RequestOutput
from quill.sampling_params import SamplingParams


def load_model(path: Path, dtype: torch.dtype = torch.float32):
    checkpoint = load_checkpoint(path)
    return build_model(checkpoint.config, checkpoint.tensors, dtype), checkpoint.config


@torch.inference_mode()
def all_position_logits(model, config: ModelConfig, token_ids: list[int]) -> torch.Tensor:
    """The plain path the engine's paths are tested against: logits at every position of one
    sequence, from a single forward pass on a scratch KV cache, the whole sequence one prompt span
    through PyTorch's attention, no engine. It rebinds the model's attention caches, so never call
    it on a model an engine is running."""
    n = len(token_ids)
    weight = model.embed_tokens.weight
    device = weight.device
    cache_dtype = kv_cache_dtype("auto", weight.dtype, device)  # as the engine's default
    for module in model.modules():
        if isinstance(module, PagedAttention):
            module.bind_cache(n, cache_dtype, device)
    positions = torch.arange(n, device=device)
    meta = AttentionMetadata(slot_mapping=positions, single_query=None,
                             prompts=[PromptSpan(start=0, num_queries=n, context_len=n, context_slots=None)])
    return model.compute_logits(model(torch.tensor(token_ids, device=device), positions, meta))


def tiny_engine(path: Path, dtype: str = "float32", **engine_options) -> Engine:
    model, config = load_model(path, getattr(torch, dtype))
    return Engine(model, config, None, EngineConfig(dtype=dtype, **engine_options))


def run_outputs(engine: Engine, prompts: list, params: SamplingParams | list[SamplingParams],
                *, arrive_every: int = 0) -> list:
    """Generate for every prompt (token ids or text); with arrive_every=k, one new prompt joins
    every k steps. Returns each prompt's final RequestOutput, in prompt order (with n > 1, the
    list of its n outputs in index order)."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    pending = list(enumerate(prompts))
    index_of: dict[str, int] = {}
    results: dict[int, dict[int, RequestOutput]] = {}
    step = 0
    while pending or engine.has_unfinished():
        if pending and (arrive_every == 0 or step % arrive_every == 0):
            arriving = pending if arrive_every == 0 else pending[:1]
            for i, prompt in arriving:
                index_of[engine.add_request(prompt, params_list[i])] = i
            pending = pending[len(arriving):]
        for output in engine.step():
            if output.finished:
                results.setdefault(index_of[output.request_id], {})[output.index] = output
        step += 1
    return [results[i][0] if len(results[i]) == 1 else [results[i][k] for k in sorted(results[i])]
            for i in range(len(prompts))]


def run_requests(engine: Engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 *, arrive_every: int = 0, with_logprobs: bool = False) -> list[list]:
    """`run_outputs`' generated token ids (one completion per prompt); `with_logprobs`: (token id,
    logprob, top) per token, for requests that ask for logprobs."""
    outputs = run_outputs(engine, prompts, params, arrive_every=arrive_every)
    return [[(r.token_id, r.logprob, r.top) for r in o.logprobs] if with_logprobs else o.token_ids for o in outputs]


def tiny_text_engine(path: Path, **engine_options) -> Engine:
    """A tiny engine with a tiny SentencePiece tokenizer, for text prompts and chat. Its 278 tokens
    are fewer than the model's 320: ids past them decode to nothing, so some tokens carry no text."""
    from tokenizer_helpers import tiny_sentencepiece_metadata
    from quill.tokenizer import Tokenizer

    model, config = load_model(path)
    tokenizer = Tokenizer.from_gguf_metadata(tiny_sentencepiece_metadata())
    return Engine(model, config, tokenizer, EngineConfig(dtype="float32", **engine_options))
