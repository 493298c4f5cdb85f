"""Structured output and tool calling for the endpoints: request fields -> a constraint and how the
answer is read back. Reusable by any endpoint that speaks OpenAI's shapes (chat, completions, and
the Responses API):

- `output_constraint(response_format, structured_outputs)`: the `SamplingParams` constraint
  fields (`json_schema`, `json_object`, `regex`, `choice`, `grammar`) for OpenAI's
  `response_format` and vLLM's `structured_outputs`, checked here so that an error names the
  client's field (`response_format.json_schema.schema`, `structured_outputs.regex`, ...).
- `plan_tools(tools, tool_choice, parallel_tool_calls, chat_template)`: a `ToolPlan`: the tools
  the chat template is given, the grammar that `tool_choice` requires ("required" and a named
  function force a valid call, "auto" lets the model choose text or calls and makes a started call
  a valid one, "none" shows no tools and constrains nothing), and the call format the answer is
  parsed in (formats in `quill/structured/tools.py`, the parser in `tool_calls.py`: the
  template's own, else the Hermes-style fallback).
- `plan_chat(...)`: both for one chat-like request (tools, tool_choice, parallel_tool_calls,
  response_format, structured_outputs, chat template): the `ToolPlan` and the constraint fields,
  with the rule that joins them (one grammar per request: tools that may be called exclude an
  output format).
- `ToolPlan.parse(text)` / `ToolPlan.stream()`: an answer's text as `content` and `tool_calls`,
  whole or as OpenAI's streamed deltas.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quill.errors import StructuredOutputError
from quill.server.protocol import ChatTool, NamedToolChoice, ResponseFormat, StructuredOutputs
from quill.structured.constraints import constraint_from_fields
from quill.structured.tool_calls import ParsedMessage, ToolCallParser, parse_tool_calls
from quill.structured.tool_messages import template_supports_tools
from quill.structured.tools import check_tools, detect_tool_format, tool_choice_grammar


def output_constraint(response_format: ResponseFormat | None,
                      structured_outputs: StructuredOutputs | None) -> dict[str, Any]:
    """`SamplingParams` keyword arguments that constrain the output ({} for free text)."""
    fields = _format_fields(response_format)
    extension = _extension_fields(structured_outputs)
    if fields and extension:
        raise StructuredOutputError("response_format and structured_outputs cannot be combined: send one",
                                    param="structured_outputs")
    fields = fields or extension
    if fields:
        (name, value), = fields.items()
        param = _param_of(response_format, name)
        try:
            constraint_from_fields(**fields)
        except StructuredOutputError as exc:
            raise StructuredOutputError(exc.message.replace(exc.param, param, 1), param=param, code=exc.code) from None
    return fields


def _format_fields(response_format: ResponseFormat | None) -> dict[str, Any]:
    if response_format is None or response_format.type == "text":
        return {}
    if response_format.type == "json_object":
        return {"json_object": True}
    schema = response_format.json_schema.schema_
    if schema is None:
        raise StructuredOutputError("response_format.json_schema needs a 'schema'",
                                    param="response_format.json_schema.schema")
    return {"json_schema": schema}


_EXTENSION_NAMES = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                    "json_object": "json_object"}


def _extension_fields(structured_outputs: StructuredOutputs | None) -> dict[str, Any]:
    if structured_outputs is None:
        return {}
    given = {name: value for name in _EXTENSION_NAMES
             if (value := getattr(structured_outputs, "json_" if name == "json" else name)) is not None
             and value is not False}
    if len(given) != 1:
        raise StructuredOutputError(f"structured_outputs takes exactly one of {', '.join(_EXTENSION_NAMES)}"
                                    f"{'' if not given else ', got ' + ' and '.join(given)}", param="structured_outputs")
    (name, value), = given.items()
    return {_EXTENSION_NAMES[name]: value}


def _param_of(response_format: ResponseFormat | None, field: str) -> str:
    """The client's name for a constraint field."""
    if response_format is not None and response_format.type != "text":
        return "response_format.json_schema.schema" if field == "json_schema" else "response_format"
    return "structured_outputs." + {v: k for k, v in _EXTENSION_NAMES.items()}[field]


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses its tools (see the module docstring)."""

    template_tools: list[dict] | None  # what the chat template receives (None: no tools shown)
    grammar: str | None  # the constraint tool_choice needs (None: free text)
    tool_format: str | None  # the call format answers are parsed in (None: not parsed, plain content)

    def parse(self, text: str) -> ParsedMessage:
        if self.tool_format is None:
            return ParsedMessage(text)
        return parse_tool_calls(text, self.tool_format)

    def stream(self) -> ToolCallParser | None:
        return ToolCallParser(self.tool_format) if self.tool_format is not None else None


NO_TOOLS = ToolPlan(None, None, None)


def plan_tools(tools: list[ChatTool] | list[dict] | None, tool_choice: Any, parallel_tool_calls: bool | None,
               chat_template: str | None) -> ToolPlan:
    """The `ToolPlan` for a request's `tools`, `tool_choice` ("none", "auto", "required", a named
    function as a model or a dict; None: "auto" with tools) and `parallel_tool_calls` (None: true)."""
    choice = tool_choice.model_dump() if isinstance(tool_choice, NamedToolChoice) else tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise StructuredOutputError("tool_choice needs tools: send the functions in 'tools'", param="tool_choice")
        return NO_TOOLS
    listed = [t.model_dump(exclude_none=True) if isinstance(t, ChatTool) else t for t in tools]
    check_tools(listed)
    choice = "auto" if choice is None else choice
    if choice == "none":
        return NO_TOOLS
    tool_format = detect_tool_format(chat_template if template_supports_tools(chat_template) else None)
    grammar = tool_choice_grammar(listed, choice, parallel_tool_calls is not False, tool_format)
    return ToolPlan(listed, grammar, tool_format)


def plan_chat(tools: Any, tool_choice: Any, parallel_tool_calls: bool | None,
              response_format: ResponseFormat | None, structured_outputs: StructuredOutputs | None,
              chat_template: str | None) -> tuple[ToolPlan, dict[str, Any]]:
    """A chat request's `ToolPlan` (render the prompt with its `template_tools`, read the answer
    with it) and the `SamplingParams` constraint fields it is decoded under."""
    plan = plan_tools(tools, tool_choice, parallel_tool_calls, chat_template)
    constraint = output_constraint(response_format, structured_outputs)
    if plan.grammar is None:
        return plan, constraint
    if constraint:
        raise StructuredOutputError("response_format and structured_outputs cannot be combined with tools "
                                    'unless tool_choice is "none"', param="response_format")
    return plan, {"grammar": plan.grammar}
