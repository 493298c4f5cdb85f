"""Tool calling, engine-side building blocks (pure functions; the server wires them to requests).

- Formats: how a model family writes a call. `hermes` (Hermes, Qwen: `<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>`, one block per call), `llama3_json` (Llama 3.x: a bare
  `{"name": ..., "parameters": {...}}`, several separated by `;`) and `mistral`
  (`[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`). `detect_tool_format` reads the chat
  template; templates without tools get `hermes` with the fallback prompt below.
- `tool_choice_grammar`: the Lark grammar (`SamplingParams(grammar=...)`) for `tool_choice`:
  "required" or a named function force one call (one or more with `parallel_tool_calls`) whose
  name is one of the tools and whose arguments validate against its `parameters` schema (inline
  `%json`); "auto" allows free text or calls, and once a call starts it must be a valid one (the
  call opener is a lazy trigger: text runs until it, then the JSON is forced).
- `ToolCallParser`: an incremental parser of a model's output into OpenAI message deltas: content
  pieces, then per call `{"index", "id", "type", "function": {"name", "arguments": ""}}` first and
  its `arguments` in pieces as they are written; `parse_tool_calls` is the same parser over the
  whole text and `join_deltas` reassembles a stream, so a streamed message joins to the
  non-streamed one. `arguments` is the call's JSON exactly as the model wrote it.
- `messages_for_template`: the conversation and tools as a chat template receives them:
  string `arguments` of assistant `tool_calls` parsed to objects (what templates expect), and
  for templates that know nothing of tools, the documented fallback: the tool list in the
  system prompt (Hermes style, `FALLBACK_TOOL_PROMPT`), earlier calls written as `<tool_call>`
  blocks in the assistant's text, and `role: "tool"` results as user turns in `<tool_response>` tags.
"""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from quill.errors import ChatTemplateError, StructuredOutputError
from quill.structured.constraints import JSON_COMPILE_OPTIONS, grammar_constraint, json_schema_constraint

FORMATS = ("hermes", "llama3_json", "mistral")
ARGUMENT_KEYS = ("arguments", "parameters")  # Llama 3 writes "parameters", the others "arguments"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule for function names (plus '.')

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
        json_schema_constraint(parameters, param=f"{where}.function.parameters")
        description = function.get("description") or ""
        checked.append(Tool(name, description if isinstance(description, str) else str(description), dict(parameters)))
    return checked


def detect_tool_format(chat_template: str | None) -> str:
    """The call format a chat template teaches its model (hermes when it teaches none)."""
    source = chat_template or ""
    if "[TOOL_CALLS]" in source:
        return "mistral"
    if "<tool_call>" in source:
        return "hermes"
    if "<|python_tag|>" in source or "ipython" in source:
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


def _required_grammar(tools: list[Tool], parallel: bool, tool_format: str) -> str:
    if tool_format == "mistral":
        array = {"type": "array", "items": call_schema(tools), "minItems": 1, **({} if parallel else {"maxItems": 1})}
        return f'start: "[TOOL_CALLS]" {_json(array)}\n'
    if tool_format == "llama3_json":
        calls = 'call ("; " call)*' if parallel else "call"
        return f"start: {calls}\ncall: {_json(call_schema(tools, 'parameters'))}\n"
    calls = 'call ("\\n" call)*' if parallel else "call"
    return f'start: {calls}\ncall: "<tool_call>\\n" {_json(call_schema(tools))} "\\n</tool_call>"\n'


def _auto_grammar(tools: list[Tool], parallel: bool, tool_format: str) -> str:
    if tool_format == "llama3_json":
        # A call is the whole output; text must then not open with "{" (as llguidance's docs do it).
        calls = 'call ("; " call)*' if parallel else "call"
        return (f"start: TEXT | {calls}\nTEXT: /[^{{](?s:.*)/\n"
                f"call: {_json(call_schema(tools, 'parameters'))}\n")
    if tool_format == "mistral":
        array = {"type": "array", "items": call_schema(tools), "minItems": 1, **({} if parallel else {"maxItems": 1})}
        return (f'start: TEXT | head {_json(array)}\nhead[lazy]: TEXT_BEFORE "[TOOL_CALLS]"\n'
                f"TEXT_BEFORE: /(?s:.*)/\nTEXT: {_without('[TOOL_CALLS]')}\n")
    # Text runs until "<tool_call>" (a lazy trigger); then a valid call is forced.
    calls = "call+" if parallel else "call"
    return (f"start: TEXT | {calls}\n"
            f'call: head "\\n"? {_json(call_schema(tools))} "\\n"? "</tool_call>"\n'
            f'head[lazy]: TEXT_BEFORE "<tool_call>"\nTEXT_BEFORE: /(?s:.*)/\n'
            f"TEXT: {_without('<tool_call>')}\n")


# ----------------------------------------------------------------------------------- parsing
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
    cut off by the end of the output keeps what was written (the finish reason tells)."""

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
        if self._call is not None and not self._call.started:
            self._content(deltas, self._opener + self._call.text)
        self._call = None
        if self._state == "array_open":
            self._content(deltas, self._opener + self._buffer)
        elif self._state != "after_call":  # after a call, only whitespace or part of a closer is left
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
        if stripped.startswith("<|python_tag|>"):
            self._buffer = stripped[len("<|python_tag|>"):]
            return True
        if not stripped or "<|python_tag|>".startswith(stripped):
            return False
        self._state = "call_expected" if stripped.startswith("{") else "plain"
        return True

    def _step_plain(self, deltas: list[dict[str, Any]]) -> bool:
        """No call can follow: everything is content."""
        self._content(deltas, self._buffer)
        self._buffer = ""
        return False

    def _step_text(self, deltas: list[dict[str, Any]]) -> bool:
        opener = "[TOOL_CALLS]" if self.format == "mistral" else "<tool_call>"
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
        separator = {"hermes": "</tool_call>", "llama3_json": ";", "mistral": ","}[self.format]
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


# ------------------------------------------------------------------------ chat templates
def template_supports_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders the `tools` it is given (it mentions the variable)."""
    return bool(chat_template) and re.search(r"\btools\b", chat_template) is not None


def messages_for_template(messages: Sequence[Mapping[str, Any]], tools: Any,
                          chat_template: str | None) -> tuple[list[dict[str, Any]], list[dict] | None]:
    """The messages (checked dicts, see `quill.tokenizer`) and `tools` to render: see the module
    docstring. `tools` is None when the template gets the fallback prompt instead (or when there
    are none). A malformed tool call is a ChatTemplateError naming the message."""
    messages = [_with_parsed_arguments(i, m) for i, m in enumerate(messages)]
    uses_tools = bool(tools) or any(isinstance(m, Mapping) and (m.get("role") == "tool" or m.get("tool_calls"))
                                    for m in messages)
    if not uses_tools or template_supports_tools(chat_template):
        return messages, (list(tools) if tools else None)
    return _fallback_messages(messages, check_tools(tools) if tools else []), None


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
    return f"<tool_call>\n{json.dumps(body, ensure_ascii=False)}\n</tool_call>"
