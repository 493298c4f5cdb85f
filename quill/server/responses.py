"""POST /v1/responses (OpenAI's Responses API), and GET and DELETE of stored responses.

A response is a chat completion in other words: the stored conversation of `previous_response_id`,
then the `instructions` as a system message, then `input` (translated by `response_items`), go
through the chat template to the engine, and the output comes back as output items
(`responses_reply.ResponsesReply`: the response object, or its semantic stream events). Prompts,
sampling, admission, the response cache and the books are chat's own (`respond`). A finished
response is stored unless `store` is false, with its conversation for the next turn
(`response_store`); `instructions` are not carried over, as in OpenAI's API.
"""
from __future__ import annotations

import time
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from quill.sampling_params import SamplingParams
from quill.server.errors import APIError
from quill.server.protocol import ResponsesRequest
from quill.server.replies import Head
from quill.server.request_log import RequestRecord
from quill.server.respond import respond
from quill.server.response_items import PlainText, chat_tool_choice, chat_tools, input_messages
from quill.server.responses_reply import ResponsesReply
from quill.server.sampling import sampling_params
from quill.server.state import ServerState


async def create_response(server: ServerState, request: Request, body: ResponsesRequest) -> Response:
    record = RequestRecord.of(request.scope)
    server.admission.check_open()
    server.model.check(body.model)
    _refuse_until_supported(body)
    conversation = _previous_conversation(server, body.previous_response_id) + input_messages(body.input)
    instructions = [{"role": "system", "content": body.instructions}] if body.instructions else []
    messages = instructions + conversation
    record.described(model=server.model.name, stream=bool(body.stream), n=1, user=body.user, prompt=messages)
    prompt_ids = await server.prompts.encode_chat(messages)
    params = sampling_params(body, [prompt_ids], server.limits, server.config.max_tokens_cap)

    def store(response: dict) -> None:
        if body.store is not False:
            server.responses.put(response, conversation + input_messages(response["output"], "output"))

    head = Head(f"resp_{record.request_id}", server.model.name, int(time.time()), include_usage=False)
    reply = ResponsesReply(head, server.token_text, params.skip_special_tokens, _echoed(body, params),
                           new_parser=PlainText, shape={}, on_final=store)
    return await respond(server, request, body, reply, [prompt_ids], params)


def get_response(server: ServerState, response_id: str) -> dict:
    return _stored(server, response_id)["response"]


def delete_response(server: ServerState, response_id: str) -> dict:
    if not server.responses.delete(response_id):
        raise _not_found(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


def _previous_conversation(server: ServerState, response_id: str | None) -> list[dict]:
    if response_id is None:
        return []
    stored = server.responses.get(response_id)
    if stored is None:
        raise APIError(400, f"Previous response with id '{response_id}' not found (it was not stored: "
                            "`store` was false, or it was deleted or evicted).",
                       param="previous_response_id", code="previous_response_not_found")
    return stored["conversation"]


def _stored(server: ServerState, response_id: str) -> dict:
    stored = server.responses.get(response_id)
    if stored is None:
        raise _not_found(response_id)
    return stored


def _not_found(response_id: str) -> APIError:
    return APIError(404, f"No response with id '{response_id}' is stored.", param="response_id", code="not_found")


def _refuse_until_supported(body: ResponsesRequest) -> None:
    chat_tools(body.tools or [])
    chat_tool_choice(body.tool_choice)
    if body.tools:
        raise APIError(400, "'tools' are not supported by this server yet.", param="tools",
                       code="unsupported_parameter")
    text_format = (body.text.format or {}) if body.text else {}
    if text_format.get("type", "text") != "text":
        raise APIError(400, f"'text.format' of type {text_format.get('type')!r} is not supported by this server yet.",
                       param="text.format.type", code="unsupported_value")


def _echoed(body: ResponsesRequest, params: SamplingParams) -> dict[str, Any]:
    """What a response object repeats of its request (sampling values as applied)."""
    text_format = body.text.format if body.text is not None and body.text.format else {"type": "text"}
    return {"instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {}, "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id, "store": body.store is not False,
            "temperature": params.temperature, "top_p": params.top_p, "text": {"format": text_format},
            "tool_choice": body.tool_choice or "auto", "tools": body.tools or [], "truncation": "disabled",
            "user": body.user, "background": False}
