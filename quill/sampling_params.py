"""Per-request generation settings, validated on construction.

This is the one home of the sampling rules (ranges, types, limits on stop strings): the Python
API, the CLI and the HTTP server all get them from here. Every error names its field (`param`).
The server's protocol models declare only the JSON types and publish `BOUNDS` in their schema.
What depends on the model (token ids within the vocabulary, the context window) is
`quill.engine.limits.EngineLimits`'."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from quill.errors import InvalidRequestError, quoted
from quill.structured.constraints import Constraint, constraint_from_fields

MAX_N = 16
MAX_LOGPROBS = 20
# Temperatures and top_p below this leave only the most likely token: greedy decoding (as in
# vLLM). Dividing logits by a vanishing temperature would overflow the sampler instead.
SAMPLING_EPS = 1e-5
MIN_REPETITION_PENALTY = 0.01  # dividing logits by less overflows them
# Stop strings are matched against held-back text on every token, on the engine thread: bound them.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LENGTH = 256
# torch seeds are signed 64-bit; each of the n completions uses seed + index.
MAX_SEED = 2**63 - 1 - MAX_N
MIN_SEED = -(2**63)
MAX_LOGIT_BIAS = 100.0


@dataclass(frozen=True)
class Bounds:
    """The range of one numeric field (inclusive, unless `low_open`)."""

    low: float | None = None
    high: float | None = None
    integer: bool = False
    low_open: bool = False

    def holds(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return above and (self.high is None or value <= self.high)

    def describe(self) -> str:
        kind = "an integer " if self.integer else ""
        if self.high is None:
            return f"{kind}>= {_number(self.low)}"
        return f"{kind}in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}]"

    def json_schema(self) -> dict[str, float]:
        """The bounds in JSON Schema's words (for the server's OpenAPI document)."""
        schema = {}
        if self.low is not None:
            schema["exclusiveMinimum" if self.low_open else "minimum"] = self.low
        if self.high is not None:
            schema["maximum"] = self.high
        return schema


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# Numeric fields and their ranges; None is allowed where the field's default is None.
BOUNDS: dict[str, Bounds] = {
    "max_tokens": Bounds(0, integer=True),  # 0: the prompt alone (to score it: prompt_logprobs)
    "temperature": Bounds(0.0, 100.0),
    "top_k": Bounds(-1, integer=True),  # 0 and -1: disabled
    "top_p": Bounds(0.0, 1.0, low_open=True),
    "min_p": Bounds(0.0, 1.0),
    "seed": Bounds(MIN_SEED, MAX_SEED, integer=True),
    "n": Bounds(1, MAX_N, integer=True),
    "min_tokens": Bounds(0, integer=True),  # and at most max_tokens
    "repetition_penalty": Bounds(MIN_REPETITION_PENALTY, 2.0),
    "presence_penalty": Bounds(-2.0, 2.0),
    "frequency_penalty": Bounds(-2.0, 2.0),
    "logprobs": Bounds(0, MAX_LOGPROBS, integer=True),
}


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 or -1: disabled
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    n: int = 1  # completions per prompt; they share the prompt's KV blocks
    min_tokens: int = 0  # EOS and stop token ids are suppressed until this many tokens
    repetition_penalty: float = 1.0  # >1 discourages any token seen in prompt or output
    presence_penalty: float = 0.0  # subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id (an int, or one as a string) -> bias
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob and the top k
    # The same for every prompt token after the first (what the model thought of the prompt:
    # scoring, `echo` with `logprobs` on /v1/completions). Every prompt token is then computed:
    # none is read from the prefix cache.
    prompt_logprobs: int | None = None
    speculative: bool = True  # allow speculative decoding when the engine has it on (no effect on output)
    # Structured output (at most one; see quill/structured/constraints.py). The output is
    # constrained token by token, and ends (finish_reason "stop") once the grammar is complete.
    json_schema: dict[str, Any] | str | None = None  # a JSON Schema, or its JSON text
    json_object: bool = False  # any JSON object (OpenAI's JSON mode)
    regex: str | None = None
    choice: list[str] | None = None  # exactly one of these strings
    grammar: str | None = None  # Lark (llguidance dialect) or GBNF

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = _as_list(self.stop, "stop", "a string or a list of strings")
        self.stop_token_ids = _as_list(self.stop_token_ids, "stop_token_ids", "a list of non-negative integers")
        self.logit_bias = _parse_logit_bias(self.logit_bias)
        self._check()
        if self.top_k == -1:
            self.top_k = 0
        self._constraint = self._checked_constraint()
        if self.temperature < SAMPLING_EPS or self.top_p < SAMPLING_EPS:
            self.temperature, self.top_p = 0.0, 1.0

    def _check(self) -> None:
        for name, bounds in BOUNDS.items():
            value = getattr(self, name)
            if value is None and name in ("seed", "logprobs"):
                continue
            if not bounds.holds(value):
                raise _invalid(name, bounds.describe(), value)
        if self.prompt_logprobs is not None and not BOUNDS["logprobs"].holds(self.prompt_logprobs):
            raise _invalid("prompt_logprobs", BOUNDS["logprobs"].describe(), self.prompt_logprobs)
        if self.min_tokens > self.max_tokens:
            raise _invalid("min_tokens", "an integer in [0, max_tokens]", self.min_tokens)
        if len(self.stop) > MAX_STOP_STRINGS or any(
                not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_STRING_LENGTH for s in self.stop):
            raise _invalid("stop", f"at most {MAX_STOP_STRINGS} non-empty strings of at most "
                                   f"{MAX_STOP_STRING_LENGTH} characters", self.stop)
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise _invalid("stop_token_ids", "a list of non-negative integers", self.stop_token_ids)

    def _checked_constraint(self) -> Constraint | None:
        constraint = constraint_from_fields(json_schema=self.json_schema, json_object=self.json_object,
                                            regex=self.regex, choice=self.choice, grammar=self.grammar)
        if constraint is not None and self.ignore_eos:
            # Nothing can follow a complete grammar: ignore_eos could not be honoured.
            raise _error(f"ignore_eos cannot be combined with {constraint.kind}: "
                         f"a constrained output ends where its grammar ends", "ignore_eos")
        return constraint

    @property
    def constraint(self) -> Constraint | None:
        """The structured-output constraint, validated (None: free text)."""
        return self._constraint

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _invalid(name: str, rule: str, value) -> InvalidRequestError:
    return _error(f"{name} must be {rule}, got {quoted(value)}", name)


def _error(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code="invalid_value")


def _as_list(value, name: str, rule: str) -> list:
    """A list or tuple field as a list (None: empty), or the field's error."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise _invalid(name, rule, value)
    return list(value)


def _parse_logit_bias(bias) -> dict[int, float]:
    """Token ids (JSON object keys are strings) -> biases in [-100, 100]."""
    if bias is not None and not isinstance(bias, Mapping):
        raise _invalid("logit_bias", "an object of token id -> bias", bias)
    parsed = {}
    for key, value in (bias or {}).items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            raise _error(f"logit_bias keys must be token ids, got {quoted(key)}", "logit_bias") from None
        if token_id < 0:
            raise _error(f"logit_bias keys must be token ids >= 0, got {quoted(key)}", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise _error(f"logit_bias values must be in [-100, 100], got {quoted(value)} for token {token_id}",
                         "logit_bias")
        parsed[token_id] = float(value)
    return parsed
