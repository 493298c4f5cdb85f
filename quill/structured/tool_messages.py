"""A conversation that uses tools, as a chat template receives it.

`messages_for_template` hands a template the conversation and tools with string `arguments` of
assistant `tool_calls` parsed to objects (what templates expect). A template that knows nothing
of tools gets the documented fallback instead: the tool list in the system prompt (Hermes style,
`FALLBACK_TOOL_PROMPT`), earlier calls written as `<tool_call>` blocks in the assistant's text,
and `role: "tool"` results as user turns in `<tool_response>` tags.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from quill.errors import ChatTemplateError
from quill.structured.tools import HERMES_CLOSE, HERMES_OPEN, Tool, check_tools

FALLBACK_TOOL_PROMPT = """# Tools

You may call one or more functions to assist with the user query. You are provided with function \
signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a JSON object with the function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def template_supports_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders the `tools` it is given (it mentions the variable)."""
    return bool(chat_template) and re.search(r"\btools\b", chat_template) is not None


def messages_for_template(messages: Sequence[Mapping[str, Any]], tools: Any,
                          chat_template: str | None) -> tuple[list[dict[str, Any]], list[dict] | None]:
    """The messages (checked dicts, see `quill.tokenizer`) and `tools` to render: see the module
    docstring. `tools` is None when the template gets the fallback prompt instead (or when there
    are none). A malformed tool call, or calls and results that do not pair up, is a
    ChatTemplateError naming the message."""
    messages = [_with_parsed_arguments(i, m) for i, m in enumerate(messages)]
    uses_tools = bool(tools) or any(isinstance(m, Mapping) and (m.get("role") == "tool" or m.get("tool_calls"))
                                    for m in messages)
    if uses_tools:
        _check_results_answer_calls(messages)
    if not uses_tools or template_supports_tools(chat_template):
        return messages, (list(tools) if tools else None)
    return _fallback_messages(messages, check_tools(tools) if tools else []), None


def _check_results_answer_calls(messages: list[dict[str, Any]]) -> None:
    """OpenAI's rule: the tool messages right after an assistant's calls answer each of them, and
    nothing else is a tool message. A result for no call, or a call left unanswered, would show the
    model a conversation that never happened."""
    pending: dict[str, int] = {}  # call id -> the message that made the call
    for index, message in enumerate(messages):
        if message.get("role") == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in pending:
                raise ChatTemplateError(f"message {index} is the result of tool call {call_id!r}, which the assistant "
                                        "message before it did not make (or another result answered already)")
            del pending[call_id]
            continue
        if pending:
            raise ChatTemplateError(f"the tool calls of message {min(pending.values())} have no results before "
                                    f"message {index}: {', '.join(map(repr, pending))}")
        if message.get("role") == "assistant":
            pending = {call.get("id"): index for call in message.get("tool_calls") or ()}
    if pending:
        raise ChatTemplateError(f"the tool calls of message {min(pending.values())} have no results: "
                                f"{', '.join(map(repr, pending))}")


def _with_parsed_arguments(index: int, message: Mapping[str, Any]) -> dict[str, Any]:
    """Templates read `tool_call.function.arguments` as an object; OpenAI sends JSON text."""
    message = dict(message)
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise ChatTemplateError(f"message {index} tool_calls must be a list of calls")
        message["tool_calls"] = [_call_with_object_arguments(index, i, call) for i, call in enumerate(calls)]
    return message


def _call_with_object_arguments(index: int, i: int, call: Any) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ChatTemplateError(f"message {index} tool_calls[{i}] must be "
                                f'{{"type": "function", "function": {{"name": ..., "arguments": ...}}}}')
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        return dict(call)
    try:
        arguments = json.loads(arguments)
    except ValueError:
        return dict(call)  # not JSON: pass it on as the client wrote it
    return {**call, "function": {**function, "arguments": arguments}}


def fallback_tool_prompt(tools: list[Tool]) -> str:
    listed = "\n".join(json.dumps({"type": "function", "function": {
        "name": t.name, "description": t.description, "parameters": t.parameters}}, ensure_ascii=False) for t in tools)
    return FALLBACK_TOOL_PROMPT.format(tools=listed)


def _fallback_messages(messages: list[Any], tools: list[Tool]) -> list[dict[str, Any]]:
    rendered = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            rendered.append({"role": "user", "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"})
        elif role == "assistant" and message.get("tool_calls"):
            blocks = [_call_block(call) for call in message["tool_calls"]]
            text = "\n".join(filter(None, [message.get("content") or "", *blocks]))
            rendered.append({key: value for key, value in message.items() if key != "tool_calls"} | {"content": text})
        else:
            rendered.append(message)
    if tools:
        prompt = fallback_tool_prompt(tools)
        if rendered and rendered[0].get("role") == "system":
            rendered[0] = {**rendered[0], "content": f"{rendered[0].get('content') or ''}\n\n{prompt}".lstrip()}
        else:
            rendered.insert(0, {"role": "system", "content": prompt})
    return rendered


def _call_block(call: Mapping[str, Any]) -> str:
    function = call.get("function") or {}
    arguments = function.get("arguments")
    body = {"name": function.get("name"), "arguments": {} if arguments is None else arguments}
    return f"{HERMES_OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{HERMES_CLOSE}"
