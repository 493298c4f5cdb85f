"""A request's fields -> `SamplingParams`: the one place where the API meets the engine's settings.

A request field named like a `SamplingParams` field is passed to it as it is (None: the default),
so `SamplingParams` applies its own rules to it; adding such a field to the protocol is the whole
change. The structured-output fields come from `response_format`/`structured_outputs`/`tools`
(`structured.py`), passed in as `constraint`. Three fields are worked out here: `max_tokens` (the
server's default when the client sets none, fitted to the context window, and the server's cap),
`min_tokens` (clamped to a max_tokens the client did not choose), `logprobs` and `prompt_logprobs`
(each endpoint says how many it asked for). What depends on the model is checked with the engine's
`EngineLimits` before the request is admitted: a request the engine would refuse never waits in
the queue.
"""
from __future__ import annotations

from dataclasses import fields

from quill.engine.limits import EngineLimits
from quill.sampling_params import SamplingParams
from quill.server.config import ServerConfig
from quill.server.protocol import SamplingFields

SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams))
# Worked out from other fields: by this function, or (the constraint) by the endpoint's structured.py.
DERIVED = frozenset({"max_tokens", "min_tokens", "logprobs", "prompt_logprobs", "json_schema", "json_object", "regex",
                     "choice", "grammar"})


def default_max_tokens(config: ServerConfig) -> int:
    """max_tokens for a request that sets none (before it is fitted to the room its prompt leaves)."""
    cap = config.max_tokens_cap
    return config.default_max_tokens if cap is None else min(config.default_max_tokens, cap)


def sampling_params(body: SamplingFields, prompts: list[list[int]], limits: EngineLimits,
                    config: ServerConfig, constraint: dict | None = None) -> SamplingParams:
    """The request's `SamplingParams` for these (tokenized) prompts, or a typed error naming the
    field. `constraint`: the structured-output fields the endpoint worked out (`structured.py`)."""
    prompt_field = body.field_names.get("prompt", "prompt")
    longest = max(len(p) for p in prompts)
    chosen = body.requested_max_tokens()  # None: the server's default, the client did not choose
    max_tokens = chosen
    if chosen is not None and config.max_tokens_cap is not None:
        max_tokens = min(chosen, config.max_tokens_cap)
    limits.check_context(longest, max_tokens, prompt_field)
    if chosen is None:
        max_tokens = min(default_max_tokens(config), limits.room_after(longest))
    min_tokens = body.min_tokens or 0
    if chosen is None or config.max_tokens_cap is not None:  # clamp min_tokens to a max_tokens the client did not set
        min_tokens = min(min_tokens, max_tokens)
    passed = {name: value for name in SAMPLING_FIELDS - DERIVED
              if (value := getattr(body, name, None)) is not None}
    params = SamplingParams(**passed, **(constraint or {}), max_tokens=max_tokens, min_tokens=min_tokens,
                            logprobs=body.requested_logprobs(), prompt_logprobs=body.requested_prompt_logprobs())
    for prompt_ids in prompts:
        limits.check_request(prompt_ids, params)
    return params
