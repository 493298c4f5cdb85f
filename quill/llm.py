"""The offline Python API: load a model once, then generate, chat or stream."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import torch

from quill.config import EngineConfig
from quill.engine.engine import Engine
from quill.errors import InvalidRequestError
from quill.models.loader import load_model_and_tokenizer
from quill.outputs import RequestOutput
from quill.sampling_params import SamplingParams
from quill.tokenizer import Tokenizer, load_tokenizer
from quill.weights.hub import resolve_model

Messages = list[dict]


def resolve_device(name: str) -> torch.device:
    """"auto" -> the first CUDA GPU when PyTorch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError(f"device {name!r} was asked for, but PyTorch sees no CUDA GPU")
    return device


class LLM:
    def __init__(self, model: str | Path, *, dtype: str = "bfloat16", max_model_len: int | None = None,
                 chat_template: str | None = None, dequantize: bool = False, tensor_parallel_size: int = 1,
                 **engine_options) -> None:
        """`model`: a .gguf file, a Hugging Face directory, or a known name (pulled on first use).
        Quantized GGUF weights run natively unless `dequantize` expands them all to `dtype` (the
        reference path). `tensor_parallel_size` > 1 splits the model over that many processes
        (spawned here, each with its share of the cores; see `quill.distributed`); `close()` stops
        them. `engine_options` are `EngineConfig` fields (block_size, kv_cache_memory, ...)."""
        started = time.perf_counter()
        engine_config = EngineConfig(dtype=dtype, max_model_len=max_model_len, **engine_options)
        engine_config.validate()  # before the slow part
        self.device = resolve_device(engine_config.device)
        self.parallel = None
        if tensor_parallel_size == 1:
            loaded = load_model_and_tokenizer(model, getattr(torch, dtype), self.device, dequantize=dequantize)
            network, self.path, self.config = loaded.model, loaded.path, loaded.config
            self.tokenizer: Tokenizer = loaded.tokenizer
        else:
            from quill.distributed import start_tensor_parallel  # torch.distributed only when asked for

            self.path = resolve_model(model)
            self.tokenizer = load_tokenizer(self.path)
            self.parallel = start_tensor_parallel(self.path, tensor_parallel_size, getattr(torch, dtype),
                                                  self.device, dequantize=dequantize)
            network, self.config = self.parallel.model, self.parallel.config
        self.chat_template = chat_template
        try:
            self.engine = Engine(network, self.config, self.tokenizer, engine_config,
                                 step_channel=None if self.parallel is None else self.parallel.channel)
        except BaseException:
            self.close()
            raise
        self.load_seconds = time.perf_counter() - started

    def close(self) -> None:
        """Stop the other ranks of a tensor-parallel model (nothing to do in one process)."""
        if self.parallel is not None:
            self.parallel.close()

    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 params: SamplingParams | None = None) -> list[RequestOutput]:
        """Run every prompt to completion, batched. Outputs come back in prompt order; with
        `params.n` > 1, each prompt's n completions are consecutive (see `RequestOutput.index`)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids: list[str] = []
        try:
            for prompt in prompts:
                ids.append(self.engine.add_request(prompt, params))
        except Exception:  # one bad prompt: withdraw the ones already queued
            for request_id in ids:
                self.engine.abort(request_id)
            raise
        return self._run_to_completion(ids)

    def chat(self, messages: Messages, params: SamplingParams | None = None,
             chat_template: str | None = None, tools: list[dict] | None = None) -> RequestOutput:
        """Answer one conversation (a list of {"role", "content"} messages; assistant `tool_calls`
        and `role: "tool"` results included). `tools` (OpenAI function tools) are shown to the
        model through its chat template; parse its answer with `quill.structured.tool_calls.parse_tool_calls`, and
        constrain it with `tool_choice_grammar` as `params.grammar`."""
        prompt = self._chat_prompt(messages, chat_template, tools)
        return self._run_to_completion([self.engine.add_request(prompt, params)])[0]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield an output each time the request produces a token (see `RequestOutput.delta`);
        with `params.n` > 1, outputs of the n completions interleave (see `RequestOutput.index`)."""
        request_id = self.engine.add_request(prompt, params)
        remaining = (params or SamplingParams()).n
        try:
            while remaining:
                for output in self.engine.step():
                    if output.request_id == request_id:
                        _raise_failure(output)
                        remaining -= output.finished
                        yield output
        finally:
            self.engine.abort(request_id)  # a consumer that stops early frees the request's blocks

    def stream_chat(self, messages: Messages, params: SamplingParams | None = None,
                    chat_template: str | None = None, tools: list[dict] | None = None) -> Iterator[RequestOutput]:
        return self.stream(self._chat_prompt(messages, chat_template, tools), params)

    def _chat_prompt(self, messages: Messages, chat_template: str | None, tools: list[dict] | None) -> list[int]:
        template = self.chat_template if chat_template is None else chat_template  # "" is a template, if an odd one
        return self.tokenizer.encode_chat(messages, chat_template=template, tools=tools)

    def _run_to_completion(self, request_ids: list[str]) -> list[RequestOutput]:
        """Step until every request is done. With n > 1, a request's n outputs come in index order."""
        final: dict[str, dict[int, RequestOutput]] = {request_id: {} for request_id in request_ids}
        try:
            while self.engine.has_unfinished():
                for output in self.engine.step():
                    if output.finished and output.request_id in final:
                        _raise_failure(output)
                        final[output.request_id][output.index] = output
        finally:
            for request_id in request_ids:
                self.engine.abort(request_id)  # no-op unless interrupted
        return [final[r][i] for r in request_ids for i in sorted(final[r])]


def _raise_failure(output: RequestOutput) -> None:
    """A completion that failed alone (its grammar broke mid-output) fails its call, as the server's
    request does; the `finally` blocks above abort whatever else of it is still running."""
    if output.error is not None:
        raise output.error
