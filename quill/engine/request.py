"""A request as the engine tracks it: its tokens, how many have KV in the cache, its blocks."""
from __future__ import annotations

import enum
import time

import torch

from quill.outputs import RequestMetrics
from quill.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 generator: torch.Generator, prompt: str | None = None, *,
                 group_id: str | None = None, index: int = 0) -> None:
        self.request_id = request_id
        # With n > 1, the n completions of one prompt are separate requests of one group.
        self.group_id = group_id or request_id
        self.index = index
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.prompt_key = hash(tuple(prompt_token_ids))  # a scheduling hint only; collisions are harmless
        self.params = params
        self.generator = generator  # per request, so a seeded request is independent of the batch
        # Its twin on the GPU the engine samples on (seeded alike), or None on the CPU.
        self.device_generator: torch.Generator | None = None
        # Every token of the sequence; those past the prompt are outputs. The last one may not
        # have its KV computed yet (it was just sampled).
        self.token_ids = list(prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose keys/values are in the cache
        # Speculative tokens proposed for the next step, not part of the sequence until verified.
        self.draft_token_ids: list[int] = []
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []  # hashes of this request's full, cached blocks
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.logprobs: list = []  # one TokenLogprob per output token, when requested
        # When requested, one per prompt token computed so far: None for the first (nothing
        # predicts it), then a TokenLogprob for each (see ModelRunner.plan).
        self.prompt_logprobs: list = [None] if params.prompt_logprobs is not None else []
        self.metrics = RequestMetrics(arrival_time=time.perf_counter())

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_decoding(self) -> bool:
        """Every token but the last sampled one has its KV computed: the state drafts build on."""
        return self.num_computed_tokens == self.num_tokens - 1

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether prompt logprobs were asked for and some are still to be computed."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"status={self.status.value})")
