"""Tool calls parsed out of a model's output (the formats: `tools.py`).

`ToolCallParser` is an incremental parser of a model's output into OpenAI message deltas: content
pieces, then per call `{"index", "id", "type", "function": {"name", "arguments": ""}}` first and its
`arguments` in pieces as they are written; `parse_tool_calls` is the same parser over the whole
text and `join_deltas` reassembles a stream, so a streamed message joins to the non-streamed one.
`arguments` is the call's JSON exactly as the model wrote it.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from quill.structured.tools import ARGUMENT_KEYS, FORMATS, HERMES_CLOSE, HERMES_OPEN, MISTRAL_OPEN, PYTHON_TAG


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedMessage:
    content: str | None  # None when the model wrote nothing but calls
    tool_calls: list[ToolCall] = field(default_factory=list)

    @property
    def finish_reason(self) -> str | None:
        """"tool_calls" when the message calls tools (OpenAI's finish reason), else None."""
        return "tool_calls" if self.tool_calls else None


def new_call_id(index: int) -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(text: str, tool_format: str = "hermes",
                     call_id: Callable[[int], str] = new_call_id) -> ParsedMessage:
    """A complete output split into content and tool calls (the streaming parser, in one go)."""
    parser = ToolCallParser(tool_format, call_id)
    return join_deltas(parser.feed(text) + parser.finish())


def join_deltas(deltas: list[dict[str, Any]]) -> ParsedMessage:
    """Reassemble streamed message deltas into the message."""
    content, calls = [], {}
    for delta in deltas:
        if "content" in delta:
            content.append(delta["content"])
        for piece in delta.get("tool_calls", ()):
            function = piece.get("function", {})
            call = calls.setdefault(piece["index"], ToolCall(piece.get("id", ""), "", ""))
            call.name += function.get("name") or ""
            call.arguments += function.get("arguments") or ""
    return ParsedMessage("".join(content) or None, [calls[i] for i in sorted(calls)])


class _NotACall(Exception):
    """The text after a call opener is not a call object: it is content after all."""


_WHITESPACE = " \t\r\n"


def _skip_whitespace(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def _string_end(text: str, i: int) -> int | None:
    """text[i] opens a JSON string: the index after its closing quote (None: not closed yet)."""
    i += 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return i + 1
        else:
            i += 1
    return None


def _value_end(text: str, i: int) -> int | None:
    """The end of the JSON value that starts at text[i] (None: it may still go on)."""
    if text[i] == '"':
        return _string_end(text, i)
    if text[i] not in "{[":
        j = i
        while j < len(text) and text[j] not in _WHITESPACE + ",}]":
            j += 1
        return j if j < len(text) else None
    depth = 0
    while i < len(text):
        if text[i] == '"':
            end = _string_end(text, i)
            if end is None:
                return None
            i = end
            continue
        depth += text[i] in "{["
        depth -= text[i] in "}]"
        i += 1
        if depth == 0:
            return i
    return None


@dataclass
class _CallScan:
    name: str | None = None
    arguments: tuple[int, int | None] | None = None  # start, end (None: still being written)
    end: int | None = None  # index after the call object's closing brace


def _scan_call(text: str) -> _CallScan:
    """What a (possibly unfinished) call object says so far."""
    scan, i = _CallScan(), _skip_whitespace(text, 0)
    if i == len(text):
        return scan
    if text[i] != "{":
        raise _NotACall
    i += 1
    while True:
        i = _skip_whitespace(text, i)
        if i == len(text):
            return scan
        if text[i] == "}":
            scan.end = i + 1
            return scan
        if text[i] == ",":
            i += 1
            continue
        if text[i] != '"':
            raise _NotACall
        key_end = _string_end(text, i)
        if key_end is None:
            return scan
        key = json.loads(text[i:key_end])
        i = _skip_whitespace(text, key_end)
        if i == len(text):
            return scan
        if text[i] != ":":
            raise _NotACall
        i = _skip_whitespace(text, i + 1)
        if i == len(text):
            return scan
        end = _value_end(text, i)
        if key in ARGUMENT_KEYS and scan.arguments is None:
            scan.arguments = (i, end)
        elif key == "name" and end is not None:
            name = json.loads(text[i:end])
            if not isinstance(name, str):
                raise _NotACall
            scan.name = name
        if end is None:
            return scan
        i = end


class _CallStream:
    """One call object arriving in pieces: its header delta once the name is known, then its
    arguments as they are written."""

    def __init__(self, index: int, call_id: Callable[[int], str]) -> None:
        self.index = index
        self.call_id = call_id
        self.text = ""
        self.started = False  # header sent
        self.arguments_sent = 0
        self.end: int | None = None

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Deltas for the new text. Raises _NotACall if it turns out not to be a call before
        anything was sent (after that, whatever follows the arguments is dropped)."""
        self.text += text
        try:
            scan = _scan_call(self.text)
        except _NotACall:
            if self.started:
                self.end = len(self.text)
                return []
            raise
        pieces = []
        if not self.started and scan.name is not None:
            self.started = True
            pieces.append({"index": self.index, "id": self.call_id(self.index), "type": "function",
                           "function": {"name": scan.name, "arguments": ""}})
        if self.started and scan.arguments is not None:
            start, end = scan.arguments
            written = self.text[start:end if end is not None else len(self.text)]
            if len(written) > self.arguments_sent:
                pieces.append({"index": self.index, "function": {"arguments": written[self.arguments_sent:]}})
                self.arguments_sent = len(written)
        self.end = scan.end
        return [{"tool_calls": [piece]} for piece in pieces]

    @property
    def done(self) -> bool:
        return self.end is not None

    @property
    def rest(self) -> str:
        """The text after the call object."""
        return self.text[self.end:] if self.end is not None else ""


class ToolCallParser:
    """Streams a model's output as OpenAI message deltas (see the module docstring).

    Framing per format: `hermes` calls sit between `<tool_call>` and `</tool_call>` anywhere in
    the text; `llama3_json` calls are the whole output (a first `{`), `;`-separated; `mistral`
    calls are a JSON array after `[TOOL_CALLS]`. Text that only looks like the start of an opener
    is held back until it is decided; an opener not followed by a call object is content. A call
    cut off by the end of the output keeps what was written (the finish reason tells); one cut off
    before its name is complete is dropped, opener and all: what followed the opener was still the
    start of a call object, so it was no text for the user, and without a name it is no call."""

    def __init__(self, tool_format: str = "hermes", call_id: Callable[[int], str] = new_call_id) -> None:
        if tool_format not in FORMATS:
            raise ValueError(f"unknown tool format {tool_format!r}; expected one of {FORMATS}")
        self.format = tool_format
        self.call_id = call_id
        self._buffer = ""
        self._state = "start" if tool_format == "llama3_json" else "text"
        self._call: _CallStream | None = None
        self._opener = ""  # the text that opened the current call, re-emitted if it is not one
        self._num_calls = 0
        self._held_space = ""  # whitespace after content: dropped if a call follows

    @property
    def num_calls(self) -> int:
        """Calls started so far."""
        return self._num_calls

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._buffer += text
        deltas: list[dict[str, Any]] = []
        while self._step(deltas):
            pass
        return deltas

    def finish(self) -> list[dict[str, Any]]:
        """Deltas for what was held back at the end of the output."""
        deltas: list[dict[str, Any]] = []
        self._call = None  # a call cut off before its name is dropped (see the class docstring)
        if self._state not in ("array_open", "after_call"):  # after a call, only whitespace or part of a closer
            self._content(deltas, self._buffer)
        self._buffer = ""
        if self._held_space and not self._num_calls:  # plain text keeps its last whitespace
            deltas.append({"content": self._held_space})
        self._held_space = ""
        return deltas

    # Each step consumes some of the buffer and says whether another step could make progress.
    def _step(self, deltas: list[dict[str, Any]]) -> bool:
        return {"start": self._step_start, "plain": self._step_plain, "text": self._step_text,
                "array_open": self._step_array_open, "call_expected": self._step_call_expected,
                "call": self._step_call, "after_call": self._step_after_call}[self._state](deltas)

    def _step_start(self, deltas: list[dict[str, Any]]) -> bool:
        """llama3_json: the output is calls if it opens with '{' (after an optional python tag)."""
        stripped = self._buffer.lstrip()
        if stripped.startswith(PYTHON_TAG):
            self._buffer = stripped[len(PYTHON_TAG):]
            return True
        if not stripped or PYTHON_TAG.startswith(stripped):
            return False
        self._state = "call_expected" if stripped.startswith("{") else "plain"
        return True

    def _step_plain(self, deltas: list[dict[str, Any]]) -> bool:
        """No call can follow: everything is content."""
        self._content(deltas, self._buffer)
        self._buffer = ""
        return False

    def _step_text(self, deltas: list[dict[str, Any]]) -> bool:
        opener = MISTRAL_OPEN if self.format == "mistral" else HERMES_OPEN
        at = self._buffer.find(opener)
        if at < 0:
            keep = _partial_suffix(self._buffer, opener)
            self._content(deltas, self._buffer[:len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep:]
            return False
        self._content(deltas, self._buffer[:at])
        # The whitespace before an opener goes with it: dropped with a call, restored without one.
        self._opener, self._held_space = self._held_space + opener, ""
        self._buffer = self._buffer[at + len(opener):]
        self._state = "array_open" if self.format == "mistral" else "call_expected"
        return True

    def _step_array_open(self, deltas: list[dict[str, Any]]) -> bool:
        i = _skip_whitespace(self._buffer, 0)
        if i == len(self._buffer):
            return False
        if self._buffer[i] != "[":
            self._content(deltas, self._opener)
            self._state = "text"
            return True
        self._opener += self._buffer[:i + 1]
        self._buffer = self._buffer[i + 1:]
        self._state = "call_expected"
        return True

    def _step_call_expected(self, deltas: list[dict[str, Any]]) -> bool:
        self._call = _CallStream(self._num_calls, self.call_id)
        self._state = "call"
        return True

    def _step_call(self, deltas: list[dict[str, Any]]) -> bool:
        call, text = self._call, self._buffer
        self._buffer = ""
        try:
            deltas.extend(call.feed(text))
        except _NotACall:  # the opener was just text
            self._content(deltas, self._opener)
            self._buffer, self._call = call.text, None
            self._state = "plain" if self.format == "llama3_json" else "text"
            return True
        if call.started and call.index == self._num_calls:
            self._num_calls += 1
        if not call.done:
            return False
        self._buffer, self._call = call.rest, None
        self._state = "after_call"
        return True

    def _step_after_call(self, deltas: list[dict[str, Any]]) -> bool:
        """Between calls: the closer or separator, then text (hermes) or the next call."""
        i = _skip_whitespace(self._buffer, 0)
        rest = self._buffer[i:]
        separator = {"hermes": HERMES_CLOSE, "llama3_json": ";", "mistral": ","}[self.format]
        if not rest or (separator.startswith(rest) and rest != separator):
            return False  # undecided: wait for more
        if rest.startswith(separator):
            self._buffer = rest[len(separator):]
            self._opener = ""
            self._state = "text" if self.format == "hermes" else "call_expected"
            return True
        if self.format == "mistral" and rest.startswith("]"):
            self._buffer, self._state = rest[1:], "text"
            return True
        self._state = "plain" if self.format == "llama3_json" else "text"
        return True

    def _content(self, deltas: list[dict[str, Any]], text: str) -> None:
        """Emit content, holding back trailing whitespace: the "\n" around a call is not content."""
        text = self._held_space + text
        kept = text.rstrip(_WHITESPACE)
        self._held_space = text[len(kept):]
        if kept:
            deltas.append({"content": kept})



def _partial_suffix(text: str, opener: str) -> int:
    """The length of the longest end of `text` that could begin `opener`."""
    for length in range(min(len(text), len(opener) - 1), 0, -1):
        if opener.startswith(text[-length:]):
            return length
    return 0
