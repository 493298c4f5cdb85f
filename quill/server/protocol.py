"""Request and response shapes of the OpenAI-compatible API, as pydantic models.

A request model declares the API's fields with their JSON types, and the rules that belong to the
API rather than to sampling (`stream_options` needs `stream`, `top_logprobs` needs `logprobs`),
raised as typed errors that name the field. The sampling rules (ranges, stop strings, logit_bias)
are `SamplingParams`': a field named like a `SamplingParams` field is handed to it unchanged
(`quill/server/sampling.py`), and the schema publishes its `BOUNDS`. Each request model also says
what the endpoint calls the engine's fields (`field_names`), so an error keeps the client's names.
Types are strict (`true` is not an integer, `"yes"` is not a boolean) and every string must be
valid Unicode (no lone surrogates). Fields of the API that Quill cannot honour (non-text content,
audio, web search, `best_of`, `suffix`, the deprecated `functions`/`function_call`, ...) are refused
by name (each model's `REFUSED`). Fields nobody defined are ignored, as vLLM does (OpenAI refuses
them): clients written for other servers send extensions of their own. The response models
document the API (they feed `/openapi.json`); the routes build plain dicts of the same shape, which
is cheaper than validating every streamed chunk.
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from quill.errors import InvalidRequestError, check_unicode
from quill.sampling_params import BOUNDS


def bounded(name: str, **field) -> Any:
    """A field whose range is `SamplingParams`' (checked there; published here). An API bound of its
    own (`ge`, `le`) replaces the published minimum or maximum."""
    schema = BOUNDS[name].json_schema()
    for bound, key in (("ge", "minimum"), ("le", "maximum")):
        if bound in field:
            schema.pop(key, None)
    return Field(**field, json_schema_extra=schema)


Text = Annotated[str, AfterValidator(check_unicode)]  # every string a request carries (JSON may escape \ud800)
MAX_TOKENS_HELP = "defaults to the server's default_max_tokens (see /v1/models), at most the rest of the context window"
# vLLM's field, refused where chat and text completions would otherwise ignore it: the API's own way is `echo`.
VLLM_PROMPT_LOGPROBS = "vLLM's prompt_logprobs field (a text completion with echo and logprobs scores its prompt)"


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class StreamOptions(_Request):
    include_usage: bool | None = False


class _Strict(BaseModel):
    """A nested object whose unknown keys are refused: each one would change the output."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True, strict=True)


class JSONSchemaFormat(_Strict):
    name: Text = Field(default="response", max_length=64)
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's `response_format` (`quill/server/structured.py` turns it into a constraint)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_for_json_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise InvalidRequestError("response_format of type json_schema needs a 'json_schema' object "
                                      "with the schema", param="response_format.json_schema")
        return self


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs`: one of these constrains the output."""

    json_: dict[str, Any] | Text | None = Field(default=None, alias="json")
    regex: Text | None = None
    choice: list[Text] | None = None
    grammar: Text | None = None
    json_object: bool | None = None


class SamplingFields(_Request):
    """Parameters shared by chat and text completions (OpenAI's, then Quill's extensions)."""

    model: Text | None = Field(default=None, description="the served model name; defaults to the only model")
    # 0 is the prompt alone: a text completion that `echo`es it with its logprobs scores it. A chat
    # and a response answer with at least one token (their models say so).
    max_tokens: int | None = bounded("max_tokens", default=None, description=MAX_TOKENS_HELP)
    # OpenAI's API stops at 2 (SamplingParams allows up to 100 for the Python API).
    temperature: float | None = bounded("temperature", default=None, ge=0.0, le=2.0)
    top_p: float | None = bounded("top_p", default=None)
    n: int = bounded("n", default=1)
    stop: Text | list[Text] | None = None
    seed: int | None = bounded("seed", default=None)
    presence_penalty: float | None = bounded("presence_penalty", default=None)
    frequency_penalty: float | None = bounded("frequency_penalty", default=None)
    logit_bias: dict[str, float] | None = Field(default=None, description="token id (as a string) -> bias in [-100, 100]")
    user: Text | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Extensions (vLLM's names).
    top_k: int | None = bounded("top_k", default=None)
    min_p: float | None = bounded("min_p", default=None)
    repetition_penalty: float | None = bounded("repetition_penalty", default=None)
    ignore_eos: bool | None = False
    min_tokens: int | None = bounded("min_tokens", default=None)
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False
    # Quill's own: false keeps this request out of the response cache, like `Cache-Control: no-store`.
    cache: bool | None = Field(default=None, description="false: do not read or write the response cache")
    # Quill's own: opt out of speculative decoding (the output is the same either way).
    speculative: bool | None = True
    # Structured output (quill/server/structured.py): OpenAI's, then vLLM's extension.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's older names for structured_outputs' kinds, read as structured_outputs.
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None

    # Fields of the API this endpoint cannot honour, each declared `Any` in its model so that it
    # is seen: set to anything but an off value (None, false, 0, "", []), a 400 naming it. An empty
    # object is no off value: `web_search_options: {}` turns web search on, with its defaults.
    REFUSED: ClassVar[dict[str, str]] = {}

    @model_validator(mode="after")
    def _refuse_what_quill_cannot_honour(self):
        for name, what in self.REFUSED.items():
            if getattr(self, name) not in (None, False, 0, "", []):
                raise InvalidRequestError(f"'{name}': {what} is not supported by this server.", param=name,
                                          code="unsupported_parameter")
        return self

    @model_validator(mode="after")
    def _guided_fields_are_structured_outputs(self):
        given = {kind: value for kind in ("json", "regex", "choice", "grammar")
                 if (value := getattr(self, f"guided_{kind}")) is not None}
        if given:
            if self.structured_outputs is not None or len(given) > 1:
                raise InvalidRequestError("send one constraint: structured_outputs or one of the guided_* fields",
                                          param=f"guided_{next(iter(given))}")
            self.structured_outputs = StructuredOutputs(**given)
        return self

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                                      param="stream_options")
        return self

    @property
    def field_names(self) -> dict[str, str]:
        """The engine's names for fields this request calls otherwise (for errors' `param`)."""
        return {}

    @property
    def include_usage(self) -> bool:
        """A streamed response ends with a chunk that carries the usage."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        """`SamplingParams.logprobs`: None (off) or how many alternatives to report per token."""
        raise NotImplementedError

    def requested_prompt_logprobs(self) -> int | None:
        """`SamplingParams.prompt_logprobs`: the same for the prompt's tokens (None: off)."""
        return None


class TextContentPart(_Request):
    type: Literal["text"]
    text: Text


class FunctionCall(_Request):
    name: Text
    arguments: Text  # JSON text, as OpenAI sends it


class ToolCall(_Request):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: Text | None = None  # a tool result: the call it answers

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content):
        """A part that is not text is refused by its kind (the union's own error would list every
        shape it tried: "Input should be a valid string (and 2 more problems)")."""
        if isinstance(content, list):
            for index, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    what = "images are" if "image" in kind else f"content parts of type {kind[:40]!r} are"
                    raise InvalidRequestError(f"Part {index} is {kind[:40]!r}: {what} not supported by this model. "
                                              "Send text parts only.", code="unsupported_value")
        return content

    @model_validator(mode="after")
    def _tool_fields_in_their_roles(self):  # params relative to the message (see errors.validation_error)
        if self.tool_calls is not None and self.role != "assistant":
            raise InvalidRequestError("only assistant messages have 'tool_calls'", param=".tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise InvalidRequestError("a tool message needs the 'tool_call_id' of the call it answers",
                                      param=".tool_call_id")
        return self


class FunctionDefinition(_Request):
    name: Text
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # Quill always enforces the schema; accepted for compatibility


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: Text


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = bounded("max_tokens", default=None, ge=1, description=MAX_TOKENS_HELP)
    max_completion_tokens: int | None = bounded("max_tokens", default=None, ge=1,
                                                description="the newer name of max_tokens")
    logprobs: bool | None = False
    top_logprobs: int | None = bounded("logprobs", default=None)
    add_generation_prompt: bool | None = True
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict] | None = None  # the deprecated names of tools and tool_choice: refused
    function_call: Text | dict | None = None
    audio: Any = None
    modalities: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    prompt_logprobs: Any = None
    REFUSED = {"audio": "audio output", "modalities": "output other than text", "web_search_options": "web search",
               "reasoning_effort": "reasoning effort (the models served here have no such setting)",
               "prompt_logprobs": VLLM_PROMPT_LOGPROBS}

    @field_validator("modalities", mode="before")
    @classmethod
    def _text_is_no_other_modality(cls, value):
        return None if value == ["text"] else value  # OpenAI's default, spelled out

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        return self

    # The deprecated names of tools and tool_choice are refused rather than read as them: a client
    # that still sends them gets told the names that work (tools: quill/server/structured.py).
    @model_validator(mode="after")
    def _no_deprecated_function_fields(self):
        for name, instead in (("functions", "tools"), ("function_call", "tool_choice")):
            value = getattr(self, name)
            if value and value != "none":
                raise InvalidRequestError(f"'{name}' is deprecated and not supported: send '{instead}'.",
                                          param=name, code="unsupported_parameter")
        return self

    @property
    def field_names(self) -> dict[str, str]:
        names = {"prompt": "messages", "logprobs": "top_logprobs"}
        if self.max_completion_tokens is not None:
            names["max_tokens"] = "max_completion_tokens"
        return names

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


PromptInput = Union[
    Text,
    Annotated[list[int], Field(min_length=1)],
    Annotated[list[Text], Field(min_length=1)],
    Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)],
]


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    logprobs: int | None = bounded("logprobs", default=None)
    echo: bool | None = False
    best_of: int | None = None
    suffix: Any = None
    prompt_logprobs: Any = None
    REFUSED = {"suffix": "inserting text before a suffix", "prompt_logprobs": VLLM_PROMPT_LOGPROBS}
    # Declared to be refused: a text completion has no tools (chat has).
    tools: Any = None
    tool_choice: Any = None

    @model_validator(mode="after")
    def _best_of_is_n(self):
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("'best_of' is not supported by this server: ask for n completions with "
                                      "logprobs and rank them yourself.", param="best_of", code="unsupported_parameter")
        return self

    @model_validator(mode="after")
    def _no_tools(self):
        for name in ("tools", "tool_choice"):
            if getattr(self, name) is not None:
                raise InvalidRequestError(f"'{name}' is not supported by /v1/completions: use /v1/chat/completions",
                                          param=name, code="unsupported_parameter")
        return self

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def requested_prompt_logprobs(self) -> int | None:
        """An echoed prompt comes with its logprobs too (the first token has none: nothing predicts it)."""
        return self.logprobs if self.echo else None


class TokenizeRequest(_Request):
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _prompt_or_messages(self):
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequestError("Send exactly one of 'prompt' or 'messages'.", param="prompt")
        return self


class DetokenizeRequest(_Request):
    model: Text | None = None
    tokens: list[int]


MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


class ResponseTextConfig(_Request):
    format: dict[str, Any] | None = None  # {"type": "text" | "json_object" | "json_schema", ...}
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(SamplingFields):
    """POST /v1/responses, OpenAI's Responses API, answered as a chat: `input` (a string, or message
    and function-call items, checked and translated in `response_items.py`) after the stored
    conversation of `previous_response_id` and the `instructions`. The sampling extensions of chat
    apply (`seed`, `stop`, `top_k`, ...); `max_output_tokens` is its `max_tokens`."""

    input: Text | Annotated[list[dict[str, Any]], Field(min_length=1)]
    instructions: Text | None = None
    max_tokens: int | None = bounded("max_tokens", default=None, ge=1, description=MAX_TOKENS_HELP)
    max_output_tokens: int | None = bounded("max_tokens", default=None, ge=1, description=MAX_TOKENS_HELP)
    metadata: dict[Text, Text] | None = None
    store: bool | None = True
    previous_response_id: Text | None = None
    text: ResponseTextConfig | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Text | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: Any = None
    conversation: Any = None
    prompt: Any = None
    reasoning: Any = None
    include: Any = None
    context_management: Any = None
    top_logprobs: Any = None
    moderation: Any = None
    REFUSED = {
        "background": "background mode", "conversation": "conversations (use previous_response_id)",
        "prompt": "stored prompt templates", "reasoning": "reasoning options", "include": "extra output data (include)",
        "context_management": "context management", "top_logprobs": "logprobs", "moderation": "moderation",
    }

    @model_validator(mode="after")
    def _one_output_without_truncation(self):
        if self.truncation == "auto":
            raise InvalidRequestError("'truncation': only \"disabled\" is supported (a prompt too long for the "
                                      "context window is an error).", param="truncation", code="unsupported_value")
        if self.text is not None and self.text.verbosity is not None:
            raise InvalidRequestError("'text.verbosity' is not supported by this server.", param="text.verbosity",
                                      code="unsupported_parameter")
        if self.n != 1:
            raise InvalidRequestError("'n': a response has one output; n must be 1.", param="n", code="invalid_value")
        return self

    @model_validator(mode="after")
    def _metadata_within_openai_limits(self):
        metadata = self.metadata or {}
        if len(metadata) > MAX_METADATA_PAIRS:
            raise InvalidRequestError(f"'metadata' may hold at most {MAX_METADATA_PAIRS} pairs.", param="metadata")
        for key, value in metadata.items():
            if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
                raise InvalidRequestError(f"'metadata': keys are at most {MAX_METADATA_KEY} characters and values "
                                          f"at most {MAX_METADATA_VALUE} ({key[:64]!r} is not).", param="metadata")
        return self

    @property
    def field_names(self) -> dict[str, str]:
        names = {"prompt": "input", "messages": "input", "json_schema": "text.format.schema",
                 "json_object": "text.format", "grammar": "tools"}
        if self.max_output_tokens is not None or self.max_tokens is None:
            names["max_tokens"] = "max_output_tokens"
        return names

    def requested_max_tokens(self) -> int | None:
        return self.max_output_tokens if self.max_output_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        return None  # top_logprobs is refused


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
    tool_calls: list[ToolCall] | None = None


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
    default_max_tokens: int | None = Field(default=None, description="max_tokens of a request that sets none "
                                                                     "(at most the room its prompt leaves)")


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
