"""Prompts from requests to token ids: text and chat messages through the model's tokenizer (and
chat template: the server's, else the model's), lists of prompts as sent to `/v1/completions`,
and token ids back to text. Long text is tokenized off the event loop."""
from __future__ import annotations

import asyncio

from quill.errors import QuillError
from quill.server.config import ServerConfig
from quill.server.errors import APIError
from quill.server.protocol import ChatMessage

# Prompts longer than this (characters) are tokenized off the event loop.
_INLINE_TOKENIZE_CHARS = 20_000


class Prompts:
    def __init__(self, tokenizer, default_chat_template: str | None, config: ServerConfig) -> None:
        self.tokenizer = tokenizer  # None: an engine that takes token ids only
        self.default_chat_template = default_chat_template
        self.config = config  # its chat_template overrides the model's, read per request

    def require_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send prompts as token ids", param="prompt")

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.require_tokenizer()
        return await _tokenize(len(text), self.tokenizer.encode, text, add_special_tokens)

    @property
    def chat_template(self) -> str | None:
        return self.default_chat_template if self.config.chat_template is None else self.config.chat_template

    async def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                          tools: list[dict] | None = None) -> list[int]:
        """`tools` reach the template (or the fallback tool prompt, see quill/structured/tool_messages.py)."""
        self.require_tokenizer()
        size = sum(len(m.get("content") or "") for m in messages)
        return await _tokenize(size, self.tokenizer.encode_chat, messages, add_generation_prompt, self.chat_template,
                               tools=tools)

    async def encode_all(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """Each prompt of a completion request as token ids (ids are taken as they are)."""
        return [await self.encode(p) if isinstance(p, str) else list(p) for p in prompts]

    def text(self, prompt: str | list[int]) -> str:
        """A prompt as text, for `echo` (an engine without a tokenizer has none)."""
        if isinstance(prompt, str):
            return prompt
        return self.tokenizer.decode(prompt) if self.tokenizer is not None else ""

    def decode(self, token_ids: list[int]) -> str:
        self.require_tokenizer()
        return self.tokenizer.decode(token_ids)


async def _tokenize(size: int, function, *args, **kwargs):
    try:
        if size > _INLINE_TOKENIZE_CHARS:  # long text: keep the event loop free meanwhile
            return await asyncio.to_thread(function, *args, **kwargs)
        return function(*args, **kwargs)
    except QuillError:
        raise
    except (TypeError, ValueError, UnicodeError):  # the protocol refuses invalid Unicode; this is the backstop
        # The tokenizer's own message names its internals ("TextInputSequence must be str"): not the client's business.
        raise APIError(400, "The text could not be tokenized: is it valid Unicode?", code="invalid_value") from None


def prompt_list(prompt) -> list[str | list[int]]:
    """A completion prompt (a string, token ids, or a list of either) as a list of prompts."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


def message_dict(message: ChatMessage) -> dict:
    """A chat message as the chat template sees it (text parts joined; `developer` is `system`;
    an assistant's `tool_calls` and a tool result's `tool_call_id` kept)."""
    content = message.content
    if content is None:
        content = None if message.tool_calls else ""
    elif not isinstance(content, str):
        content = "\n".join(part.text for part in content)
    role = "system" if message.role == "developer" else message.role
    result = {"role": role, "content": content}
    if message.name is not None:
        result["name"] = message.name
    if message.tool_calls:
        result["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    if message.tool_call_id is not None:
        result["tool_call_id"] = message.tool_call_id
    return result
