"""What the engine hands back for each request: text, tokens and the request's timeline."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Monotonic timestamps (time.perf_counter) of a request's life, and derived latencies."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_generated_tokens: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    max_inter_token_latency: float | None = None  # longest gap between two output tokens

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        """Time to first token, from arrival."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    @property
    def decode_time(self) -> float | None:
        if self.first_token_time is None or self.last_token_time is None:
            return None
        return self.last_token_time - self.first_token_time

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Tokens after the first, per second of decoding (the first token is prefill's)."""
        decode_time = self.decode_time
        if not decode_time or self.num_generated_tokens < 2:
            return None
        return (self.num_generated_tokens - 1) / decode_time


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated so far
    text: str  # generated text so far
    delta: str  # text new since the previous output of this request
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort", "error" or None while running
    metrics: RequestMetrics
    prompt: str | None = None
    new_token_ids: list[int] = field(default_factory=list)
    index: int = 0  # which of the prompt's n completions this is
    logprobs: list | None = None  # TokenLogprob per output token, when requested
    error: Exception | None = None  # finish_reason "error": why this completion failed alone
    # When requested: None for the first prompt token, then a TokenLogprob per prompt token.
    prompt_logprobs: list | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids)
