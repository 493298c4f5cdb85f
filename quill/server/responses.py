"""POST /v1/responses (OpenAI's Responses API), and GET and DELETE of stored responses.

A response is a chat completion in other words: the stored conversation of `previous_response_id`,
then the `instructions` as a system message, then `input` (translated by `response_items`), go
through the chat template to the engine, and the output comes back as output items
(`responses_reply.ResponsesReply`: the response object, or its semantic stream events). Prompts,
sampling, admission, the response cache and the books are chat's own (`respond`), and so is the
plan for function tools (`structured.plan_tools`: what the template shows, the grammar
`tool_choice` needs, the call format the output is parsed in); `text.format` (JSON) or that grammar
becomes the `SamplingParams` constraint. A finished
response is stored unless `store` is false, with its conversation for the next turn
(`response_store`); `instructions` are not carried over, as in OpenAI's API.
"""
from __future__ import annotations

import time
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from quill.errors import StructuredOutputError
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
from quill.server.structured import ToolPlan, output_constraint, plan_tools


async def create_response(server: ServerState, request: Request, body: ResponsesRequest) -> Response:
    record = RequestRecord.of(request.scope)
    server.admission.check_open()
    server.model.check(body.model)
    tools = _plan_tools(body, server.prompts.chat_template)
    constraint = _constraint(body, tools)
    conversation = _previous_conversation(server, body.previous_response_id) + input_messages(body.input)
    instructions = [{"role": "system", "content": body.instructions}] if body.instructions else []
    messages = instructions + conversation
    record.described(model=server.model.name, stream=bool(body.stream), n=1, user=body.user, prompt=messages)
    prompt_ids = await server.prompts.encode_chat(messages, tools=tools.template_tools)
    params = sampling_params(body, [prompt_ids], server.limits, server.config, constraint)

    def store(response: dict) -> None:
        if body.store is not False:
            server.responses.put(response, conversation + input_messages(response["output"], "output"))

    head = Head(f"resp_{record.request_id}", server.model.name, int(time.time()), include_usage=False)
    reply = ResponsesReply(head, server.token_text, params.skip_special_tokens, _echoed(body, params),
                           new_parser=lambda: tools.stream() or PlainText(), shape={"tool_format": tools.tool_format},
                           on_final=store)
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


def _plan_tools(body: ResponsesRequest, chat_template: str | None) -> ToolPlan:
    """Chat's plan for the request's function tools (see `structured.plan_tools`), its errors in
    Responses' names (tools[i].parameters, not chat's tools[i].function.parameters)."""
    tools = chat_tools(body.tools) if body.tools else None
    try:
        return plan_tools(tools, chat_tool_choice(body.tool_choice), body.parallel_tool_calls, chat_template)
    except StructuredOutputError as exc:
        raise StructuredOutputError(exc.message.replace(".function.", "."),
                                    param=exc.param.replace(".function.", ".")) from None


def _constraint(body: ResponsesRequest, tools: ToolPlan) -> dict[str, Any]:
    """SamplingParams' constraint fields for `text.format`, or chat's `response_format` /
    `structured_outputs` (the extensions every endpoint takes), or the tools' grammar: only one can
    apply. SamplingParams checks them; its errors name the Responses fields (`field_names`)."""
    fields = _text_format_fields(body)
    extension = output_constraint(body.response_format, body.structured_outputs)
    if fields and extension:
        raise APIError(400, "'text.format' cannot be combined with response_format or structured_outputs: "
                            "send one.", param="text.format", code="unsupported_value")
    fields = fields or extension
    if tools.grammar is not None and fields:
        raise APIError(400, "An output format cannot be combined with tools the model may call (set tool_choice "
                            "to \"none\", or leave the format as text).", param="text.format",
                       code="unsupported_value")
    return {"grammar": tools.grammar} if tools.grammar is not None else fields


def _text_format_fields(body: ResponsesRequest) -> dict[str, Any]:
    text_format = (body.text.format if body.text is not None else None) or {"type": "text"}
    kind = text_format.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_object": True}
    if kind != "json_schema":
        raise APIError(400, f"'text.format.type' must be text, json_object or json_schema, got {kind!r}.",
                       param="text.format.type", code="unsupported_value")
    if not isinstance(text_format.get("name"), str):
        raise APIError(400, "'text.format.name' is required for a json_schema format.", param="text.format.name",
                       code="missing_required_parameter")
    if not isinstance(text_format.get("schema"), dict):
        raise APIError(400, "'text.format.schema' must be a JSON Schema object.", param="text.format.schema",
                       code="invalid_type")
    return {"json_schema": text_format["schema"]}


def _echoed(body: ResponsesRequest, params: SamplingParams) -> dict[str, Any]:
    """What a response object repeats of its request (sampling values as applied)."""
    text_format = body.text.format if body.text is not None and body.text.format else {"type": "text"}
    return {"instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {}, "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id, "store": body.store is not False,
            "temperature": params.temperature, "top_p": params.top_p, "text": {"format": text_format},
            "tool_choice": body.tool_choice or "auto", "tools": body.tools or [], "truncation": "disabled",
            "user": body.user, "background": False}
