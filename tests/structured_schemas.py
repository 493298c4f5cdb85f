"""JSON schemas for property tests of structured output: deterministic random ones, and the shapes
common in tool definitions. Every schema bounds its output (string lengths, array sizes, integer
ranges, no free extra properties), so that a correct constrained decoder always finishes within
a modest max_tokens: an output cut off by max_tokens is a failure, not noise."""
from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

import jsonschema

WORDS = ["red", "green", "blue", "low", "high", "open", "closed", "cat", "dog", "yes", "no", "north", "south"]
KEYS = ["name", "id", "kind", "size", "color", "count", "level", "tag", "mode", "city", "unit", "score", "flag"]

TOOL_PARAMETER_SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"location": {"type": "string", "maxLength": 20},
                                      "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
     "required": ["location"], "additionalProperties": False},
    {"type": "object", "properties": {"query": {"type": "string", "minLength": 1, "maxLength": 24},
                                      "max_results": {"type": "integer", "minimum": 1, "maximum": 10},
                                      "safe": {"type": "boolean"}},
     "required": ["query"], "additionalProperties": False},
    {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 16},
        "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
        "attendees": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
     "required": ["title", "date"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": -100, "maximum": 100},
                                      "b": {"type": "integer", "minimum": -100, "maximum": 100},
                                      "op": {"enum": ["add", "sub", "mul", "div"]}},
     "required": ["a", "b", "op"], "additionalProperties": False},
    {"type": "object", "properties": {
        "to": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"},
        "subject": {"type": "string", "maxLength": 20}, "urgent": {"type": "boolean"}},
     "required": ["to", "subject"], "additionalProperties": False},
    {"type": "object", "properties": {"filters": {"type": "object", "properties": {
        "min_price": {"type": "integer", "minimum": 0, "maximum": 999},
        "category": {"enum": ["books", "music", "games"]}}, "additionalProperties": False},
        "sort": {"enum": ["asc", "desc"]}},
     "required": ["filters"], "additionalProperties": False},
    {"type": "object", "properties": {"user_id": {"type": "integer", "minimum": 1, "maximum": 99999},
                                      "fields": {"type": "array", "items": {"enum": ["email", "name", "age"]},
                                                 "minItems": 1, "maxItems": 3}},
     "required": ["user_id", "fields"], "additionalProperties": False},
    {"type": "object", "properties": {"path": {"type": "string", "pattern": "^/[a-z]{1,8}(/[a-z]{1,8}){0,2}$"},
                                      "recursive": {"type": "boolean"}},
     "required": ["path"], "additionalProperties": False},
    {"type": "object", "properties": {"amount": {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.01},
                                      "currency": {"enum": ["USD", "EUR", "GBP"]},
                                      "note": {"anyOf": [{"type": "string", "maxLength": 12}, {"type": "null"}]}},
     "required": ["amount", "currency"], "additionalProperties": False},
    {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                                                          "y": {"type": "integer", "minimum": 0, "maximum": 99}},
                         "required": ["x", "y"], "additionalProperties": False}},
     "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
     "required": ["start", "end"], "additionalProperties": False},
    {"type": "object", "properties": {"language": {"const": "python"},
                                      "code": {"type": "string", "maxLength": 24}},
     "required": ["language", "code"], "additionalProperties": False},
    {"type": "object", "properties": {"rating": {"type": "integer", "minimum": 1, "maximum": 5},
                                      "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{2,6}$"},
                                               "maxItems": 2},
                                      "public": {"type": ["boolean", "null"]}},
     "required": ["rating"], "additionalProperties": False},
]


def _property(rng: random.Random, depth: int) -> dict[str, Any]:
    kind = rng.choice(["integer", "boolean", "enum", "string", "pattern", "array", "nullable", "const", "number"]
                      + (["object"] if depth < 2 else []))
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(2, 4))}
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 12)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(["^[a-z]{2,6}$", "^[A-Z][a-z]{1,5}$", "^[0-9]{3}-[0-9]{2}$",
                                                         "^(on|off)$", "^v[0-9]\\.[0-9]$"])}
    if kind == "array":
        item = rng.choice([{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": rng.sample(WORDS, 3)},
                           {"type": "boolean"}])
        return {"type": "array", "items": item, "minItems": rng.randint(0, 1), "maxItems": rng.randint(1, 3)}
    if kind == "nullable":
        return {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "null"}]}
    if kind == "const":
        return {"const": rng.choice(WORDS)}
    if kind == "number":  # multipleOf bounds the decimals: a bare number may run on forever (seen: 90 digits)
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 100]), "multipleOf": rng.choice([0.01, 0.5])}
    return _object(rng, depth + 1, rng.randint(1, 2))


def _object(rng: random.Random, depth: int, size: int) -> dict[str, Any]:
    keys = rng.sample(KEYS, size)
    properties = {key: _property(rng, depth) for key in keys}
    required = [key for key in keys if rng.random() < 0.7] or keys[:1]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def generated_schemas(count: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [_object(rng, 0, rng.randint(1, 3)) for _ in range(count)]


def property_test_schemas(count: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    """`count` schemas: the tool shapes first, then generated ones."""
    return TOOL_PARAMETER_SCHEMAS + generated_schemas(count - len(TOOL_PARAMETER_SCHEMAS), seed)


def _multiple_of(validator, step, instance, schema):
    """multipleOf in decimal: 284.27 is a multiple of 0.01 (jsonschema's float division says not)."""
    if validator.is_type(instance, "number") and Decimal(str(instance)) % Decimal(str(step)) != 0:
        yield jsonschema.ValidationError(f"{instance!r} is not a multiple of {step}")


_Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"multipleOf": _multiple_of})


def validate(instance: Any, schema: dict[str, Any]) -> None:
    """`jsonschema.validate`, with multipleOf checked on the decimal numbers JSON writes."""
    _Validator.check_schema(schema)
    _Validator(schema).validate(instance)
