"""POST /v1/chat/completions: a conversation through the chat template, answered (by the engine
or the response cache) as one body or as a stream of chunks. Tools and output formats are planned
by `structured.py`; the reply parses tool calls out of the answer."""
from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import Response

from quill.server.protocol import ChatCompletionRequest
from quill.server.prompts import message_dict
from quill.server.replies import ChatReply, Head
from quill.server.request_log import RequestRecord
from quill.server.respond import respond
from quill.server.sampling import sampling_params
from quill.server.state import ServerState
from quill.server.structured import plan_chat


async def chat_completion(server: ServerState, request: Request, body: ChatCompletionRequest) -> Response:
    record = RequestRecord.of(request.scope)
    server.admission.check_open()
    server.model.check(body.model)
    messages = [message_dict(m) for m in body.messages]
    record.described(model=server.model.name, stream=bool(body.stream), n=body.n, user=body.user, prompt=messages)
    tools, constraint = plan_chat(body.tools, body.tool_choice, body.parallel_tool_calls, body.response_format,
                                  body.structured_outputs, server.prompts.chat_template)
    prompt_ids = await server.prompts.encode_chat(messages, body.add_generation_prompt is not False,
                                                  tools.template_tools)
    params = sampling_params(body, [prompt_ids], server.limits, server.config, constraint)
    head = Head(f"chatcmpl-{record.request_id}", server.model.name, int(time.time()), body.include_usage)
    reply = ChatReply(head, server.token_text, params.skip_special_tokens, logprobs=bool(body.logprobs),
                      top_logprobs=body.top_logprobs or 0, tools=tools)
    return await respond(server, request, body, reply, [prompt_ids], params)
