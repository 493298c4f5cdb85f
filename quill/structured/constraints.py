"""What a request may constrain its output to, turned into a grammar the matcher runs.

Five kinds, named as vLLM's structured outputs name them (and as `SamplingParams` fields):
- `json_schema`: a JSON Schema (a dict, or its JSON text);
- `json_object`: any JSON object (OpenAI's `response_format={"type": "json_object"}`);
- `regex`: a regular expression the whole output matches (Rust `regex` syntax; `\\d` and `\\w` are ASCII);
- `choice`: exactly one of a list of strings;
- `grammar`: a Lark grammar (llguidance's dialect), or a GBNF (llama.cpp) grammar, which is converted.

Each becomes an llguidance grammar. Its canonical `key` (the kind and the spec as compact JSON) is
what compiled grammars are cached by, so the same schema sent as a dict or as differently spaced
JSON text compiles once. Key order is part of the key: properties are written in schema order. Checking a grammar needs no tokenizer, so `SamplingParams` checks its
constraint when it is built: an invalid schema or a keyword the matcher does not implement is a
`StructuredOutputError` naming the field, never silently ignored (llguidance refuses what it does
not implement, e.g. `uniqueItems`, `not`, `if`/`then`; see benchmarks/structured_matchers.py).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from quill.errors import StructuredOutputError

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
# JSON output is written as json.dumps writes it: one space after ',' and ':', no other whitespace.
# Flexible whitespace lets small models emit runs of newlines and spaces until max_tokens (seen with
# SmolLM2-135M), and these separators are the most common spelling in training data.
JSON_COMPILE_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_CHOICES = 1024
MAX_SPEC_CHARS = 1 << 20  # schemas and grammars above a megabyte are refused before compiling
# Counted repetitions ({n}, {m,n}) are built out state by state while the lexer runs, on the
# engine thread: measured on the tiny engine, a{100000} took 1.8 s before its first token and
# a{99999999} failed mid-step ("too many expressions constructed"), failing the whole batch.
# JSON maxLength/maxItems are not built that way (maxLength 99999999 costs nothing).
MAX_REPEAT = 4096
_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
_ERROR_CHARS = 400  # llguidance errors can quote a whole grammar; keep the message readable


@dataclass(frozen=True)
class Constraint:
    kind: str  # one of KINDS
    key: str  # canonical spec: what compiled grammars are cached by
    grammar: str  # the llguidance grammar (JSON text) the matcher compiles


def constraint_from_fields(*, json_schema: Any = None, json_object: bool = False, regex: Any = None,
                           choice: Any = None, grammar: Any = None) -> Constraint | None:
    """The one constraint that SamplingParams-style fields ask for (None: unconstrained)."""
    given = {"json_schema": json_schema, "json_object": json_object or None, "regex": regex,
             "choice": choice, "grammar": grammar}
    given = {name: value for name, value in given.items() if value is not None}
    if len(given) > 1:
        raise StructuredOutputError(f"{' and '.join(given)} cannot be combined: set at most one of "
                                    f"{', '.join(KINDS)}", param=list(given)[1])
    if not given:
        return None
    (kind, value), = given.items()
    if kind == "json_object" and value is not True:
        raise StructuredOutputError(f"json_object must be true or false, got {json_object!r}", param="json_object")
    return BUILDERS[kind](value)


def json_schema_constraint(schema: Any, param: str = "json_schema") -> Constraint:
    """A JSON Schema (dict, or JSON text of one)."""
    if isinstance(schema, str):
        if len(schema) > MAX_SPEC_CHARS:
            raise StructuredOutputError(f"{param} is longer than {MAX_SPEC_CHARS} characters", param=param)
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise StructuredOutputError(f"{param} is not valid JSON: {exc}", param=param) from None
    if not isinstance(schema, dict):
        raise StructuredOutputError(f"{param} must be a JSON Schema object, got {type(schema).__name__}", param=param)
    try:
        # Key order is kept: the order of "properties" is the order the output writes them in.
        key = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StructuredOutputError(f"{param} is not a JSON document: {exc}", param=param) from None
    if len(key) > MAX_SPEC_CHARS:
        raise StructuredOutputError(f"{param} is longer than {MAX_SPEC_CHARS} characters", param=param)
    return _checked("json_schema", key, param)


def json_object_constraint() -> Constraint:
    """Any JSON object: OpenAI's JSON mode."""
    return _checked("json_object", '{"type":"object"}', "json_object")


def regex_constraint(pattern: Any) -> Constraint:
    _check_text(pattern, "regex")
    return _checked("regex", pattern, "regex")


def choice_constraint(choices: Any) -> Constraint:
    if isinstance(choices, str) or not isinstance(choices, (list, tuple)) or not choices:
        raise StructuredOutputError("choice must be a non-empty list of strings", param="choice")
    if len(choices) > MAX_CHOICES or any(not isinstance(c, str) or not c for c in choices):
        raise StructuredOutputError(f"choice must be at most {MAX_CHOICES} non-empty strings", param="choice")
    return _checked("choice", json.dumps(list(choices), ensure_ascii=False), "choice")


def grammar_constraint(text: Any) -> Constraint:
    _check_text(text, "grammar")
    return _checked("grammar", text, "grammar")


BUILDERS = {"json_schema": json_schema_constraint, "json_object": lambda _: json_object_constraint(),
            "regex": regex_constraint, "choice": choice_constraint, "grammar": grammar_constraint}


def _check_text(value: Any, param: str) -> None:
    if not isinstance(value, str) or not value:
        raise StructuredOutputError(f"{param} must be a non-empty string", param=param)
    if len(value) > MAX_SPEC_CHARS:
        raise StructuredOutputError(f"{param} is longer than {MAX_SPEC_CHARS} characters", param=param)


def _checked(kind: str, key: str, param: str) -> Constraint:
    for match in _REPEAT.finditer(key if kind != "choice" else ""):  # choices are literal text
        count = max(int(n) for n in match.groups() if n)
        if count > MAX_REPEAT:
            raise StructuredOutputError(f"{param} repeats a pattern {count} times ({match.group(0)}); at most "
                                        f"{MAX_REPEAT} is supported (a JSON schema's maxLength or maxItems has no "
                                        f"such limit)", param=param)
    return Constraint(kind=kind, key=f"{kind}:{key}", grammar=_grammar(kind, key, param))


@lru_cache(maxsize=512)  # a server sees the same few schemas again and again: check each once
def _grammar(kind: str, key: str, param: str) -> str:
    """The llguidance grammar for a canonical spec, checked without a tokenizer."""
    import llguidance

    matcher = llguidance.LLMatcher
    if kind in ("json_schema", "json_object"):
        grammar = matcher.grammar_from_json_schema(key, defaults=JSON_COMPILE_OPTIONS)
    elif kind == "regex":
        # \d and \w match ASCII only, as in JSON Schema patterns: Rust's Unicode classes would let
        # "[0-9]-looking" digits from other scripts through (seen: Telugu digits for \d\d).
        grammar = matcher.grammar_from_lark(f"start: /{llguidance.regex_to_lark(key, 'dw')}/")
    elif kind == "choice":
        grammar = llguidance.grammar_from("choice", json.loads(key))
    else:
        try:
            grammar = llguidance.grammar_from("grammar", key)  # Lark as is, GBNF converted to Lark
        except ValueError as exc:
            raise StructuredOutputError(f"grammar is neither Lark nor valid GBNF: {_short(exc)}", param=param) from None
    error = matcher.validate_grammar(grammar)
    if error:
        raise grammar_error(error, param)
    return grammar


def grammar_error(message: str, param: str) -> StructuredOutputError:
    """A matcher's complaint as the user-facing error: unsupported (a feature the matcher lacks)
    or invalid (a mistake in the request)."""
    message = _short(message)
    if "Unimplemented" in message or "not supported" in message.lower():
        return StructuredOutputError(f"{param} uses a feature structured output does not support: {message}",
                                     param=param)
    return StructuredOutputError(f"{param} is invalid: {message}", param=param)


def _short(message: Any) -> str:
    message = str(message).strip()
    return message if len(message) <= _ERROR_CHARS else message[:_ERROR_CHARS] + " ..."
