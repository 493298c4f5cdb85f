"""What a request must fit, fixed once an engine is built: the context window (never longer than
the KV cache holds), the vocabulary and the KV cache's size. `EngineLimits` is a read-only
summary its clients (the server) ask for instead of reaching into the engine, and the one home of
the rules that depend on these limits: the engine checks every request with them, and the server
checks with the same functions before it admits a request, so that a bad one is refused before it
waits in the queue."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from quill.errors import ContextLengthError, InvalidRequestError
from quill.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineLimits:
    max_model_len: int  # the context window: prompt and output tokens together
    vocab_size: int
    num_kv_blocks: int
    block_size: int  # tokens per KV block
    dtype: str  # the compute dtype: not a limit, but part of what an answer depends on
    kv_cache_bytes: int = 0  # what the KV cache's tensors take (at most the budget it was sized from)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size

    def room_after(self, prompt_tokens: int) -> int:
        """Output tokens left after a prompt in the context window (at least 1). The window is never
        longer than the KV cache (see `quill.engine.kv_cache.plan_kv_cache`)."""
        return max(1, self.max_model_len - prompt_tokens)

    def check_token_ids(self, token_ids: Iterable[int], field: str) -> None:
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"Invalid token ids in '{field}': {bad} is not in [0, {self.vocab_size})",
                                      param=field)

    def check_context(self, prompt_tokens: int, max_tokens: int | None = None, field: str = "prompt") -> None:
        """The prompt must leave room to generate; with `max_tokens`, prompt and output must both fit
        (OpenAI's rule for its API; the engine itself stops a longer output at the window)."""
        window = self.max_model_len
        if prompt_tokens >= window:
            raise ContextLengthError(
                f"This model's maximum context length is {window} tokens. However, your {field} resulted in "
                f"{prompt_tokens} tokens, which leaves no room in the context window to generate. "
                f"Please reduce the length of the {field}.", param=field)
        if max_tokens is not None and prompt_tokens + max_tokens > window:
            raise ContextLengthError(
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {field}, {max_tokens} in the "
                f"completion). Please reduce the length of the {field} or completion.", param=field)

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """What every request must satisfy, whoever submits it."""
        if not prompt_ids:
            raise InvalidRequestError("The prompt is empty.", param="prompt")
        self.check_token_ids(prompt_ids, "prompt")
        self.check_token_ids(params.logit_bias, "logit_bias")
        self.check_token_ids(params.stop_token_ids, "stop_token_ids")
        self.check_context(len(prompt_ids))
