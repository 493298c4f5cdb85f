"""The Responses API in chat's terms, both ways. A response is answered as a chat completion
(`responses.py`), so this is the whole translation:

- `input_messages`: `input` (a string, or message, `function_call` and `function_call_output`
  items) -> chat messages (`developer` is `system`; calls become an assistant message's
  `tool_calls`, outputs `role: "tool"` messages). Output items are valid input items, so a stored
  response's output joins its conversation through the same function.
- `chat_tools`, `chat_tool_choice`: Responses' flat function tools and tool choice -> chat's.
- `OutputItems`: the model's output, as chat message deltas (content pieces; per tool call a
  header with its name, then its arguments in pieces), -> output items (a `message` with one
  `output_text` part, `function_call`s), with the stream events that build them in OpenAI's order.

Anything that is not text or a function (images, files, built-in tools, reasoning items) is
refused with an error naming its place in the request, never dropped.
"""
from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable
from typing import Any

from quill.errors import InvalidRequestError

_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = {"user": ("input_text",), "system": ("input_text",), "developer": ("input_text",),
               "assistant": ("output_text", "refusal")}
_TOOL_CHOICES = ("none", "auto", "required")


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ------------------------------------------------------------------------------ input
def input_messages(items: str | list[dict[str, Any]], param: str = "input") -> list[dict[str, Any]]:
    """Input items as chat messages; consecutive calls (and the assistant text before them) make one
    assistant turn."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"{param}[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            call = _function_call(item, where)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": _text_field(item, "call_id", where),
                             "content": _output_text(item.get("output"), f"{where}.output")})
        else:
            raise InvalidRequestError(f"'{where}': input items of type {kind!r} are not supported (this server "
                                      "takes message, function_call and function_call_output items).",
                                      param=f"{where}.type", code="unsupported_value")
    return messages


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in _ROLES:
        raise InvalidRequestError(f"'{where}.role' must be one of {', '.join(_ROLES)}, got {role!r}.",
                                  param=f"{where}.role", code="invalid_value")
    content = item.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = "\n".join(_part_text(part, role, f"{where}.content[{j}]") for j, part in enumerate(content))
    else:
        raise InvalidRequestError(f"'{where}.content' must be a string or a list of content parts.",
                                  param=f"{where}.content", code="invalid_type")
    return {"role": "system" if role == "developer" else role, "content": text}


def _part_text(part: Any, role: str, where: str) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in _TEXT_PARTS[role]:
        allowed = " or ".join(_TEXT_PARTS[role])
        raise InvalidRequestError(f"'{where}': {role} content parts of type {kind!r} are not supported (this server "
                                  f"takes text: {allowed}).", param=f"{where}.type", code="unsupported_value")
    return _text_field(part, "refusal" if kind == "refusal" else "text", where)


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    return {"id": _text_field(item, "call_id", where), "type": "function",
            "function": {"name": _text_field(item, "name", where), "arguments": _text_field(item, "arguments", where)}}


def _output_text(output: Any, where: str) -> str:
    """A function_call_output's output: a string, or input_text parts."""
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return "\n".join(_part_text(part, "user", f"{where}[{j}]") for j, part in enumerate(output))
    raise InvalidRequestError(f"'{where}' must be a string or a list of input_text parts.", param=where,
                              code="invalid_type")


def _text_field(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise InvalidRequestError(f"'{where}.{name}' must be a string.", param=f"{where}.{name}",
                                  code="missing_required_parameter" if value is None else "invalid_type")
    return value


# ------------------------------------------------------------------------------ tools
def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses' function tools ({"type": "function", "name", "description", "parameters"}) as chat's."""
    converted = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise InvalidRequestError(f"'tools[{i}]': tools of type {kind!r} are not supported (built-in tools such "
                                      "as web_search and file_search are OpenAI's; this server calls functions "
                                      "you define).", param=f"tools[{i}].type", code="unsupported_value")
        function = {key: tool[key] for key in ("name", "description", "parameters") if tool.get(key) is not None}
        converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """"none", "auto", "required" or {"type": "function", "name": ...} as chat's tool_choice (None,
    not sent, stays None)."""
    if choice is None or (isinstance(choice, str) and choice in _TOOL_CHOICES):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequestError('\'tool_choice\' must be "none", "auto", "required" or {"type": "function", '
                              f'"name": ...}} (built-in tools are not supported), got {choice!r}.',
                              param="tool_choice", code="unsupported_value")


# ------------------------------------------------------------------------------ output
class OutputItems:
    """A response's output items, built from the model's output as chat message deltas, and the
    stream events (without `sequence_number`) that build them. Items are written one at a time:
    content opens a message (if none is open), a call's header closes the open item and opens a
    `function_call`. `finish` closes the last one, and makes an empty message when there was no
    output at all, so a response always has an item."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._calls: dict[int, dict[str, Any]] = {}  # a tool call's delta index -> its item

    def feed(self, deltas: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for delta in deltas:
            if delta.get("content"):
                if self._open is None or self._open["type"] != "message":
                    events += self._close("completed") + self._open_message()
                events += self._text(delta["content"])
            for piece in delta.get("tool_calls", ()):
                if piece["index"] not in self._calls:
                    events += self._close("completed") + self._open_call(piece)
                events += self._arguments(self._calls[piece["index"]], piece.get("function", {}).get("arguments") or "")
        return events

    def finish(self, status: str) -> list[dict[str, Any]]:
        """Close the open item with `status` ("completed", or "incomplete" when cut off)."""
        events = [] if self.items else self._open_message()
        return events + self._close(status)

    # ------------------------------------------------------------------ messages
    def _open_message(self) -> list[dict[str, Any]]:
        item = {"id": new_item_id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                "content": []}
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        added = self._add(item)
        item["content"].append(part)
        return [added, {"type": "response.content_part.added", **self._where(item), "content_index": 0,
                        "part": copy.deepcopy(part)}]

    def _text(self, piece: str) -> list[dict[str, Any]]:
        item = self._open
        item["content"][0]["text"] += piece
        return [{"type": "response.output_text.delta", **self._where(item), "content_index": 0, "delta": piece,
                 "logprobs": []}]

    # ------------------------------------------------------------------- calls
    def _open_call(self, header: dict[str, Any]) -> list[dict[str, Any]]:
        function = header.get("function", {})
        item = {"id": new_item_id("fc"), "type": "function_call", "status": "in_progress", "call_id": header["id"],
                "name": function.get("name", ""), "arguments": ""}
        self._calls[header["index"]] = item
        return [self._add(item)]

    def _arguments(self, item: dict[str, Any], piece: str) -> list[dict[str, Any]]:
        if not piece:
            return []
        item["arguments"] += piece
        return [{"type": "response.function_call_arguments.delta", **self._where(item), "delta": piece}]

    # ------------------------------------------------------------------- items
    def _add(self, item: dict[str, Any]) -> dict[str, Any]:
        self.items.append(item)
        self._open = item
        return {"type": "response.output_item.added", "output_index": len(self.items) - 1,
                "item": copy.deepcopy(item)}

    def _where(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"item_id": item["id"], "output_index": self.items.index(item)}

    def _close(self, status: str) -> list[dict[str, Any]]:
        item, self._open = self._open, None
        if item is None:
            return []
        item["status"] = status
        events = []
        if item["type"] == "message":
            part = item["content"][0]
            events += [{"type": "response.output_text.done", **self._where(item), "content_index": 0,
                        "text": part["text"], "logprobs": []},
                       {"type": "response.content_part.done", **self._where(item), "content_index": 0,
                        "part": copy.deepcopy(part)}]
        else:
            events.append({"type": "response.function_call_arguments.done", **self._where(item),
                           "name": item["name"], "arguments": item["arguments"]})
        events.append({"type": "response.output_item.done", "output_index": self.items.index(item),
                       "item": copy.deepcopy(item)})
        return events


class PlainText:
    """The model's output as message deltas when no tool can be called: all of it is content (the
    same interface as the tool-call parser, `feed` then `finish`)."""

    def feed(self, text: str) -> list[dict[str, Any]]:
        return [{"content": text}] if text else []

    def finish(self) -> list[dict[str, Any]]:
        return []
