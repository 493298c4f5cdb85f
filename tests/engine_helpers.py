"""Helpers for driving the engine and the bare model on tiny test models."""
from __future__ import annotations

from pathlib import Path

import torch

from quill.config import EngineConfig
from quill.engine.engine import Engine
from quill.models import build_model
from quill.outputs import RequestOutput
from quill.sampling_params import SamplingParams
from quill.weights import load_checkpoint


def load_model(path: Path, dtype: torch.dtype = torch.float32):
    checkpoint = load_checkpoint(path)
    return build_model(checkpoint.config, checkpoint.tensors, dtype), checkpoint.config


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
                 *, arrive_every: int = 0) -> list[list[int]]:
    """`run_outputs`' generated token ids (one completion per prompt)."""
    return [output.token_ids for output in run_outputs(engine, prompts, params, arrive_every=arrive_every)]


def tiny_text_engine(path: Path, **engine_options) -> Engine:
    """A tiny engine with a tiny SentencePiece tokenizer, for text prompts and chat. Its 278 tokens
    are fewer than the model's 320: ids past them decode to nothing, so some tokens carry no text."""
    from tokenizer_helpers import tiny_sentencepiece_metadata
    from quill.tokenizer import Tokenizer

    model, config = load_model(path)
    tokenizer = Tokenizer.from_gguf_metadata(tiny_sentencepiece_metadata())
    return Engine(model, config, tokenizer, EngineConfig(dtype="float32", **engine_options))
