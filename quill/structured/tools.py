"""Tool calling, engine-side building blocks (pure functions; the server wires them to requests).

- Formats: how a model family writes a call. `hermes` (Hermes, Qwen: `<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>`, one block per call), `llama3_json` (Llama 3.x: a bare
  `{"name": ..., "parameters": {...}}`, several separated by `;`) and `mistral`
  (`[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`). `detect_tool_format` reads the chat
  template; templates without tools get `hermes` with the fallback prompt of `tool_messages.py`.
- `tool_choice_grammar`: the Lark grammar (`SamplingParams(grammar=...)`) for `tool_choice`:
  "required" or a named function force one call (one or more with `parallel_tool_calls`) whose
  name is one of the tools and whose arguments validate against its `parameters` schema (inline
  `%json`); "auto" allows free text or calls, and once a call starts it must be a valid one (the
  call opener is a lazy trigger: text runs until it, then the JSON is forced).

Parsing a model's calls back out is `tool_calls.py`; a conversation with tools, as a chat template
receives it, is `tool_messages.py`.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from quill.errors import StructuredOutputError
from quill.structured.constraints import JSON_COMPILE_OPTIONS, grammar_constraint, json_schema_constraint

FORMATS = ("hermes", "llama3_json", "mistral")
ARGUMENT_KEYS = ("arguments", "parameters")  # Llama 3 writes "parameters", the others "arguments"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule for function names (plus '.')
# The text around calls in each format: the grammars force it, the parser (tool_calls.py) finds it,
# and a conversation for a template without tools writes it (tool_messages.py).
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_OPEN = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"  # Llama 3 may open its calls with it


# ------------------------------------------------------------------------------------ tools
@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]


def check_tools(tools: Any) -> list[Tool]:
    """OpenAI-shaped `tools` ([{"type": "function", "function": {"name", "description",
    "parameters"}}]) checked, each `parameters` schema compiled-checked, names unique."""
    if not isinstance(tools, Sequence) or isinstance(tools, str) or not tools:
        raise StructuredOutputError("tools must be a non-empty list of function tools", param="tools")
    checked, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise StructuredOutputError(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}", param=where)
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise StructuredOutputError(f"{where}.function must be an object with a name", param=f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise StructuredOutputError(f"{where}.function.name must be 1-64 letters, digits, '_', '-' or '.', "
                                        f"got {name!r}", param=f"{where}.function.name")
        if name in names:
            raise StructuredOutputError(f"{where}.function.name {name!r} is used twice", param=f"{where}.function.name")
        names.add(name)
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if isinstance(parameters, Mapping) and parameters.get("type", "object") != "object":
            # a call's arguments are a JSON object (as OpenAI requires of the schema)
            raise StructuredOutputError(f"{where}.function.parameters must be a JSON Schema of type \"object\", got "
                                        f"type {parameters['type']!r}", param=f"{where}.function.parameters")
        json_schema_constraint(parameters, param=f"{where}.function.parameters")
        description = function.get("description") or ""
        checked.append(Tool(name, description if isinstance(description, str) else str(description), dict(parameters)))
    return checked


def detect_tool_format(chat_template: str | None) -> str:
    """The call format a chat template teaches its model (hermes when it teaches none)."""
    source = chat_template or ""
    if MISTRAL_OPEN in source:
        return "mistral"
    if HERMES_OPEN in source:
        return "hermes"
    if PYTHON_TAG in source or "ipython" in source:
        return "llama3_json"
    return "hermes"


# --------------------------------------------------------------------------------- grammars
def tool_choice_grammar(tools: Any, tool_choice: Any = "auto", parallel_tool_calls: bool = True,
                        tool_format: str = "hermes") -> str | None:
    """The Lark grammar that makes the output obey `tool_choice` (None for "none": free text)."""
    if tool_format not in FORMATS:
        raise ValueError(f"unknown tool format {tool_format!r}; expected one of {FORMATS}")
    checked = check_tools(tools)
    if tool_choice == "none":
        return None
    if tool_choice == "auto":
        grammar = _auto_grammar(checked, parallel_tool_calls, tool_format)
    elif tool_choice == "required":
        grammar = _required_grammar(checked, parallel_tool_calls, tool_format)
    else:
        grammar = _required_grammar([_named_tool(checked, tool_choice)], parallel_tool_calls, tool_format)
    grammar_constraint(grammar)  # a bug here is ours, but fail on the request, not in the engine
    return grammar


def _named_tool(tools: list[Tool], tool_choice: Any) -> Tool:
    function = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or tool_choice.get("type", "function") != "function":
        raise StructuredOutputError('tool_choice must be "none", "auto", "required" or '
                                    '{"type": "function", "function": {"name": ...}}', param="tool_choice")
    for tool in tools:
        if tool.name == name:
            return tool
    raise StructuredOutputError(f"tool_choice names function {name!r}, which is not among the tools "
                                f"({', '.join(t.name for t in tools)})", param="tool_choice")


def call_schema(tools: list[Tool], arguments_key: str = "arguments") -> dict[str, Any]:
    """The JSON Schema of one call: the name is one of the tools, the arguments match its parameters."""
    variants = [{"type": "object", "properties": {"name": {"const": t.name}, arguments_key: t.parameters},
                 "required": ["name", arguments_key], "additionalProperties": False} for t in tools]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def _json(schema: dict[str, Any]) -> str:
    """An inline JSON schema, written the way `json_schema` constraints are (no free whitespace)."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_COMPILE_OPTIONS}, ensure_ascii=False)


def _lark_string(text: str) -> str:
    return json.dumps(text)


def _without(text: str) -> str:
    """A Lark terminal: any text that does not contain `text` (llguidance's & and ~ operators)."""
    return f"/(?s:.*)/ & ~/(?s:.*){re.escape(text)}(?s:.*)/"


def _call_array(tools: list[Tool], parallel: bool) -> dict[str, Any]:
    """The schema of Mistral's calls: a JSON array of them (one, without `parallel`)."""
    return {"type": "array", "items": call_schema(tools), "minItems": 1, **({} if parallel else {"maxItems": 1})}


def _llama3_calls(parallel: bool) -> str:
    """Llama 3's calls: one, or several separated by "; "."""
    return 'call ("; " call)*' if parallel else "call"


def _required_grammar(tools: list[Tool], parallel: bool, tool_format: str) -> str:
    if tool_format == "mistral":
        return f"start: {_lark_string(MISTRAL_OPEN)} {_json(_call_array(tools, parallel))}\n"
    if tool_format == "llama3_json":
        calls = _llama3_calls(parallel)
        return f"start: {calls}\ncall: {_json(call_schema(tools, 'parameters'))}\n"
    calls = 'call ("\\n" call)*' if parallel else "call"
    opener, closer = _lark_string(HERMES_OPEN + "\n"), _lark_string("\n" + HERMES_CLOSE)
    return f"start: {calls}\ncall: {opener} {_json(call_schema(tools))} {closer}\n"


def _auto_grammar(tools: list[Tool], parallel: bool, tool_format: str) -> str:
    if tool_format == "llama3_json":
        # A call is the whole output; text must then not open with "{" (as llguidance's docs do it).
        calls = _llama3_calls(parallel)
        return (f"start: TEXT | {calls}\nTEXT: /[^{{](?s:.*)/\n"
                f"call: {_json(call_schema(tools, 'parameters'))}\n")
    if tool_format == "mistral":
        return (f"start: TEXT | head {_json(_call_array(tools, parallel))}\n"
                f"head[lazy]: TEXT_BEFORE {_lark_string(MISTRAL_OPEN)}\n"
                f"TEXT_BEFORE: /(?s:.*)/\nTEXT: {_without(MISTRAL_OPEN)}\n")
    # Text runs until the opener (a lazy trigger); then a valid call is forced.
    calls = "call+" if parallel else "call"
    return (f"start: TEXT | {calls}\n"
            f'call: head "\\n"? {_json(call_schema(tools))} "\\n"? {_lark_string(HERMES_CLOSE)}\n'
            f"head[lazy]: TEXT_BEFORE {_lark_string(HERMES_OPEN)}\nTEXT_BEFORE: /(?s:.*)/\n"
            f"TEXT: {_without(HERMES_OPEN)}\n")
