"""Request and response shapes of the OpenAI-compatible API, as pydantic models.

Requests are validated here (types, ranges); whatever passes is turned into `SamplingParams` by
the routes, which re-check the rest. Unknown fields are ignored, as OpenAI does. The response
models document the API (they feed `/openapi.json`); the routes build plain dicts of the same
shape, which is cheaper than validating every streamed chunk.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from quill.sampling_params import MAX_LOGPROBS, MAX_N

# torch seeds are signed 64-bit; each of the n completions uses seed + index.
MAX_SEED = 2**63 - 1 - MAX_N
MIN_SEED = -(2**63)

TokenId = Annotated[int, Field(ge=0)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool | None = False


class _SamplingFields(_Request):
    """Parameters shared by chat and text completions (OpenAI's, then Quill's extensions)."""

    model: str | None = Field(default=None, description="the served model name; defaults to the only model")
    max_tokens: int | None = Field(default=None, ge=1, description="defaults to the rest of the context window")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=MIN_SEED, le=MAX_SEED)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(default=None, description="token id (as a string) -> bias in [-100, 100]")
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Extensions (vLLM's names).
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    # Far below 1 the penalty scales logits past what float32 sampling survives.
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=2.0)
    ignore_eos: bool | None = False
    min_tokens: int | None = Field(default=None, ge=0)
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False
    # Quill's own: false keeps this request out of the response cache, like `Cache-Control: no-store`.
    cache: bool | None = Field(default=None, description="false: do not read or write the response cache")
    # Quill's own: opt out of speculative decoding (the output is the same either way).
    speculative: bool | None = True


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="the newer name of max_tokens")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool | None = True


PromptInput = Union[
    str,
    Annotated[list[TokenId], Field(min_length=1)],
    Annotated[list[str], Field(min_length=1)],
    Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)],
]


class CompletionRequest(_SamplingFields):
    prompt: PromptInput
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[TokenId]


# ------------------------------------------------------------------------------ responses


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class PricePer1K(BaseModel):
    input_per_1k: float
    output_per_1k: float


class QuillCost(BaseModel):
    """A request's cost in US dollars: self-hosted at the price the server measured (null until it
    has measured one), and what the same tokens cost on each reference API. A response cache hit
    costs nothing self-hosted and saves what computing the answer cost when it was stored
    (`saved_usd`; null if no price had been measured then)."""

    self_hosted_usd: float | None
    self_hosted_price: PricePer1K | None
    reference_usd: dict[str, float]
    saved_usd: float | None = 0.0


class QuillUsage(BaseModel):
    """Quill's timings for this request, in seconds (null when not measured), whether the answer
    came from the response cache (then the token counts are the original answer's), and its cost."""

    queue_time: float | None
    time_to_first_token: float | None
    generation_time: float | None
    tokens_per_second: float | None
    inter_token_latency_mean: float | None
    inter_token_latency_max: float | None
    e2e_latency: float | None
    cache_hit: bool = False
    cost: QuillCost


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    quill: QuillUsage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "quill"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class ReferenceUsage(PricePer1K):
    usd: float


class ModelUsage(BaseModel):
    model: str
    requests: int
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    self_hosted_usd: float
    self_hosted_price: PricePer1K | None
    reference: dict[str, ReferenceUsage]
    cache_hits: int  # answered from the response cache: not in the counts and dollars above
    cache_saved_usd: float  # self-hosted cost those answers had when they were computed


class UsageReport(BaseModel):
    """Traffic and cost since the server started, per model (`GET /v1/usage`): the engine's work,
    and apart from it the response cache's hits and what they saved."""

    object: Literal["usage"] = "usage"
    hourly_cost_usd: float
    data: list[ModelUsage]


class HealthResponse(BaseModel):
    status: str


class VersionResponse(BaseModel):
    version: str


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
