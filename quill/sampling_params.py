"""Per-request generation settings, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from quill.errors import InvalidRequestError
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
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob and the top k
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
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        self._check()
        self._constraint = self._checked_constraint()
        if self.temperature < SAMPLING_EPS or self.top_p < SAMPLING_EPS:
            self.temperature, self.top_p = 0.0, 1.0

    def _check(self) -> None:
        def bad(name: str, rule: str) -> InvalidRequestError:
            return InvalidRequestError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise bad("max_tokens", "an integer >= 1")
        if not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", "between 0 and 100")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "0 (disabled), -1 (disabled) or a positive integer")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "in [0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise bad("seed", "an integer or None")
        if len(self.stop) > MAX_STOP_STRINGS or any(
                not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_STRING_LENGTH for s in self.stop):
            raise bad("stop", f"at most {MAX_STOP_STRINGS} non-empty strings of at most "
                              f"{MAX_STOP_STRING_LENGTH} characters")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of non-negative integers")
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise bad("n", f"an integer in [1, {MAX_N}]")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", "an integer in [0, max_tokens]")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", f"in [{MIN_REPETITION_PENALTY}, 2]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "in [-2, 2]")
        if any(t < 0 or not -100.0 <= b <= 100.0 for t, b in self.logit_bias.items()):
            raise bad("logit_bias", "a map of token id to a bias in [-100, 100]")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]")

    def _checked_constraint(self) -> Constraint | None:
        constraint = constraint_from_fields(json_schema=self.json_schema, json_object=self.json_object,
                                            regex=self.regex, choice=self.choice, grammar=self.grammar)
        if constraint is not None and self.ignore_eos:
            # Nothing can follow a complete grammar: ignore_eos could not be honoured.
            raise InvalidRequestError(f"ignore_eos cannot be combined with {constraint.kind}: "
                                      f"a constrained output ends where its grammar ends")
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
