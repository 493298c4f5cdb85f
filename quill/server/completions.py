"""POST /v1/completions: one or more prompts (text or token ids) continued, answered (by the engine
or the response cache) as one body or as a stream of chunks; `echo` puts each prompt before its
completions."""
from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import Response

from quill.server.protocol import CompletionRequest
from quill.server.prompts import prompt_list
from quill.server.replies import CompletionReply, Head
from quill.server.request_log import RequestRecord
from quill.server.respond import respond
from quill.server.sampling import sampling_params
from quill.server.state import ServerState
from quill.server.structured import output_constraint


async def completion(server: ServerState, request: Request, body: CompletionRequest) -> Response:
    record = RequestRecord.of(request.scope)
    server.admission.check_open()
    server.model.check(body.model)
    record.described(model=server.model.name, stream=bool(body.stream), n=body.n, user=body.user,
                     prompt=body.prompt)
    raw_prompts = prompt_list(body.prompt)
    prompts = await server.prompts.encode_all(raw_prompts)
    constraint = output_constraint(body.response_format, body.structured_outputs)
    params = sampling_params(body, prompts, server.limits, server.config, constraint)
    echo = [server.prompts.text(p) if body.echo else "" for p in raw_prompts]
    head = Head(f"cmpl-{record.request_id}", server.model.name, int(time.time()), body.include_usage)
    reply = CompletionReply(head, server.token_text, params.skip_special_tokens, logprobs=body.logprobs, echo=echo,
                            prompts=prompts)
    return await respond(server, request, body, reply, prompts, params)
