"""How an answer looks on the wire, per endpoint: a `Reply` shapes a run's choices into OpenAI's
response body, each engine update into stream chunks, and a stored answer (response cache) into
the same chunks a live stream would have sent (each choice's text in one chunk, after its role).
`sse` and `sse_response` frame chunks as server-sent events.

A new response format is a new `Reply`: the envelope (`body`, `chunk`) is OpenAI's chat and text
completion one, and an endpoint with another envelope overrides it."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from fastapi.responses import StreamingResponse

from quill import __version__
from quill.server.errors import APIError
from quill.server.logprobs import TokenText, chat_logprobs, completion_logprobs, echoed_completion_logprobs
from quill.server.runs import Choice, Run, Update
from quill.server.structured import NO_TOOLS, ToolPlan
from quill.structured.tool_calls import ToolCallParser

SYSTEM_FINGERPRINT = f"quill-{__version__}"
DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class Head:
    """What every body and chunk of one response carries."""

    id: str
    model: str
    created: int  # Unix seconds
    include_usage: bool  # a stream ends with a usage chunk (and every chunk has "usage": null)


class Reply:
    endpoint: str  # part of the response cache key
    object: str  # of the whole response
    chunk_object: str  # of each streamed chunk

    def __init__(self, head: Head, token_text: TokenText, skip_special: bool) -> None:
        self.head = head
        self.token_text = token_text
        self.skip_special = skip_special  # special tokens are left out of text and of logprobs' bytes
        self.shape: dict = {}  # request fields that change the body beyond prompt and sampling (cache key)

    def body(self, choices: list[dict], usage: dict) -> dict:
        head = self.head
        return {"id": head.id, "object": self.object, "created": head.created, "model": head.model,
                "choices": choices, "usage": usage, "system_fingerprint": SYSTEM_FINGERPRINT}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        head = self.head
        payload = {"id": head.id, "object": self.chunk_object, "created": head.created, "model": head.model,
                   "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices}
        if head.include_usage:
            payload["usage"] = usage
        return sse(payload)

    def choices(self, run: Run) -> list[dict]:
        """A finished run's choices, as in the response body."""
        raise NotImplementedError

    def live(self, update: Update) -> list[dict]:
        """The chunk choices (one per chunk) an engine update sends."""
        raise NotImplementedError

    def replay(self, choices: list[dict]) -> Iterator[dict]:
        """The chunk choices of a stored answer's `choices`."""
        raise NotImplementedError

    # A stream is `opening()`, then `events(update)` per engine update (or `replayed(choices)` for a
    # stored answer), then `stopped(choices)` if the server stopped it (shutdown), then
    # `closing(usage)`; `failure(error)` ends one that failed after it began. Chat and text
    # completions send one chunk per choice update, then usage and [DONE]; an endpoint with other
    # events (the Responses API) overrides these.
    def opening(self) -> list[str]:
        return []

    def events(self, update: Update) -> list[str]:
        return [self.chunk([choice]) for choice in self.live(update)]

    def replayed(self, choices: list[dict]) -> list[str]:
        return [self.chunk([choice]) for choice in self.replay(choices)]

    def stopped(self, choices: list[Choice]) -> list[str]:
        """Each unfinished choice's last chunks (finish_reason "abort")."""
        return [self.chunk([entry]) for choice in choices if choice.finish_reason is None
                for entry in self.aborted(choice)]

    def closing(self, usage: dict) -> list[str]:
        return ([self.chunk([], usage)] if self.head.include_usage else []) + [DONE]

    def failure(self, error: APIError) -> list[str]:
        return [sse(error.body()), DONE]

    def aborted(self, choice: Choice) -> list[dict]:
        """The chunk choices that end an unfinished choice the server stopped (finish_reason "abort")."""
        raise NotImplementedError


class ChatReply(Reply):
    """Chat bodies and chunks. With tools (a `ToolPlan` that parses), each answer is split into
    `content` and `tool_calls` (finish reason "tool_calls" where a finished answer calls tools),
    and streamed as OpenAI streams calls: per call its index, id, type and name with empty
    arguments first, then the arguments in pieces, so that joining the deltas gives the body's
    message."""

    endpoint = "chat"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, head: Head, token_text: TokenText, skip_special: bool, logprobs: bool,
                 top_logprobs: int, tools: ToolPlan = NO_TOOLS) -> None:
        super().__init__(head, token_text, skip_special)
        self.logprobs, self.top_logprobs = logprobs, top_logprobs
        self.tools = tools
        self.shape = {"logprobs": logprobs, "top_logprobs": top_logprobs, "tool_format": tools.tool_format}
        self._started: set[int] = set()  # choices whose role went out
        self._parsers: dict[int, ToolCallParser] = {}  # per streamed choice, with tools

    def choices(self, run: Run) -> list[dict]:
        choices = []
        for c in run.choices:
            message = self.tools.parse(c.text)
            body = {"role": "assistant", "content": message.content}
            if message.tool_calls:
                body["tool_calls"] = [call.to_openai() for call in message.tool_calls]
            elif body["content"] is None:
                body["content"] = ""
            choices.append({"index": c.index, "message": body,
                            "logprobs": self._logprobs(c.logprobs) if self.logprobs else None,
                            "finish_reason": _finish_reason(c.finish_reason, bool(message.tool_calls))})
        return choices

    def live(self, update: Update) -> list[dict]:
        index = update.choice.index
        entries = []
        if index not in self._started:
            self._started.add(index)
            entries.append(_chat_entry(index, {"role": "assistant", "content": ""}))
        deltas = self._deltas(index, update) or [{}]  # {}: a chunk only if it carries logprobs or the finish
        calls = index in self._parsers and self._parsers[index].num_calls > 0
        finish_reason = _finish_reason(update.choice.finish_reason, calls) if update.finished else None
        logprobs = self._logprobs(update.new_logprobs) if update.new_logprobs is not None else None
        for i, delta in enumerate(deltas):
            last = i == len(deltas) - 1
            if delta or (last and (finish_reason or logprobs is not None)):
                entries.append(_chat_entry(index, delta, logprobs if i == 0 else None, finish_reason if last else None))
        return entries

    def _deltas(self, index: int, update: Update) -> list[dict]:
        """The message deltas of an update's new text: content, or tool-call pieces with tools."""
        if self.tools.tool_format is None:
            return [{"content": update.delta}] if update.delta else []
        parser = self._parsers.setdefault(index, self.tools.stream())
        deltas = parser.feed(update.delta)
        if update.finished:
            deltas += parser.finish()
        return deltas

    def aborted(self, choice: Choice) -> list[dict]:
        entries = []
        if choice.index not in self._started:
            self._started.add(choice.index)
            entries.append(_chat_entry(choice.index, {"role": "assistant", "content": ""}))
        # With tools, the text the call parser held back (a possible call's opening) goes out first.
        held = self._parsers[choice.index].finish() if choice.index in self._parsers else []
        return [*entries, *(_chat_entry(choice.index, delta) for delta in held), _chat_entry(choice.index, {}, None, "abort")]

    def replay(self, choices: list[dict]) -> Iterator[dict]:
        for choice in choices:
            index, message = choice["index"], choice["message"]
            yield _chat_entry(index, {"role": "assistant", "content": ""})
            deltas = [{"content": message["content"]}] if message["content"] else []
            for i, call in enumerate(message.get("tool_calls") or ()):
                function = call["function"]
                deltas.append({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                               "function": {"name": function["name"], "arguments": ""}}]})
                deltas.append({"tool_calls": [{"index": i, "function": {"arguments": function["arguments"]}}]})
            deltas = deltas or [{}]
            for i, delta in enumerate(deltas):
                last = i == len(deltas) - 1
                yield _chat_entry(index, delta, choice["logprobs"] if i == 0 else None,
                                  choice["finish_reason"] if last else None)

    def _logprobs(self, logprobs: list) -> dict:
        return {"content": chat_logprobs(self.token_text, logprobs, self.top_logprobs, self.skip_special)}


def _finish_reason(engine_reason: str | None, calls: bool) -> str | None:
    """OpenAI's "tool_calls" for an answer that ended by itself with calls."""
    return "tool_calls" if calls and engine_reason == "stop" else engine_reason


class CompletionReply(Reply):
    endpoint = "completions"
    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, head: Head, token_text: TokenText, skip_special: bool, logprobs: int | None,
                 echo: list[str], prompts: list[list[int]]) -> None:
        super().__init__(head, token_text, skip_special)
        self.logprobs = logprobs
        self.echo = echo  # per prompt: its text when echoed, else ""
        self.prompts = prompts  # token ids: an echoed prompt's logprobs start with its first token
        self.shape = {"logprobs": logprobs, "echo": echo}
        self._offsets: dict[int, int] = {}  # per started choice: characters sent before its next token

    def choices(self, run: Run) -> list[dict]:
        choices = []
        for c in run.choices:
            prefix = self.echo[c.prompt_index]
            logprobs = None
            if self.logprobs is not None:
                logprobs, _ = self._logprobs(c, c.logprobs, len(prefix), echoing=True)
            choices.append({"index": c.index, "text": prefix + c.text, "logprobs": logprobs,
                            "finish_reason": c.finish_reason})
        return choices

    def live(self, update: Update) -> list[dict]:
        choice = update.choice
        text = update.delta
        echoing = choice.index not in self._offsets
        if echoing:  # its first output: echo the prompt (with its logprobs, when asked for)
            prefix = self.echo[choice.prompt_index]
            text = prefix + text
            self._offsets[choice.index] = len(prefix)
        finish_reason = choice.finish_reason if update.finished else None
        if not (text or finish_reason or update.new_logprobs):
            return []
        logprobs = None
        if update.new_logprobs is not None:
            logprobs, self._offsets[choice.index] = self._logprobs(choice, update.new_logprobs,
                                                                   self._offsets[choice.index], echoing)
        return [_completion_entry(choice.index, text, logprobs, finish_reason)]

    def aborted(self, choice: Choice) -> list[dict]:
        echo = "" if choice.index in self._offsets else self.echo[choice.prompt_index]  # not sent yet
        return [_completion_entry(choice.index, echo, None, "abort")]

    def replay(self, choices: list[dict]) -> Iterator[dict]:
        for choice in choices:
            yield _completion_entry(choice["index"], choice["text"], choice["logprobs"], choice["finish_reason"])

    def _logprobs(self, choice: Choice, logprobs: list, offset: int, echoing: bool) -> tuple[dict, int]:
        """The `logprobs` of these records of `choice`, from character `offset` of its text (the
        echoed prompt's first where this part echoes it and they were computed), and the offset after."""
        if echoing and choice.prompt_logprobs is not None:
            return echoed_completion_logprobs(self.token_text, self.prompts[choice.prompt_index], choice.prompt_logprobs,
                                              logprobs, self.logprobs, self.skip_special, offset)
        return completion_logprobs(self.token_text, logprobs, self.logprobs, self.skip_special, offset)


def _chat_entry(index: int, delta: dict, logprobs=None, finish_reason: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def _completion_entry(index: int, text: str, logprobs=None, finish_reason: str | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def sse(payload: dict, event: str | None = None) -> str:
    """One server-sent event; `event` names it (the Responses API's events are named, chat's are not)."""
    data = f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"
    return data if event is None else f"event: {event}\n{data}"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    """A stream of events already in memory (a stored answer); a live one is a `streaming.LiveStream`."""
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
