"""POST /tokenize and /detokenize: the model's tokenizer (and chat template) as the server uses it."""
from __future__ import annotations

from quill.server.protocol import DetokenizeRequest, TokenizeRequest
from quill.server.prompts import message_dict
from quill.server.state import ServerState


async def tokenize(server: ServerState, body: TokenizeRequest) -> dict:
    server.model.check(body.model)
    if body.prompt is not None:
        ids = await server.prompts.encode(body.prompt, body.add_special_tokens)
    else:
        ids = await server.prompts.encode_chat([message_dict(m) for m in body.messages], body.add_generation_prompt)
    return {"tokens": ids, "count": len(ids), "max_model_len": server.limits.max_model_len}


def detokenize(server: ServerState, body: DetokenizeRequest) -> dict:
    server.model.check(body.model)
    server.prompts.require_tokenizer()
    server.limits.check_token_ids(body.tokens, "tokens")
    return {"prompt": server.prompts.decode(body.tokens)}
