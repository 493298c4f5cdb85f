"""Logprobs in OpenAI's two shapes: `chat_logprobs` (chat completions: token, logprob, bytes and top
alternatives) and `completion_logprobs` (legacy completions: parallel lists with text offsets;
`echoed_completion_logprobs` with the echoed prompt's tokens first). `TokenText` gives the bytes and
text of single tokens, undoing byte-level (GPT-2) and SentencePiece piece encodings; impossible
tokens are reported as -9999 since JSON has no infinity.
"""
from __future__ import annotations

import math
import re


def _finite(value: float) -> float:
    """JSON has no infinities; OpenAI reports impossible tokens as -9999."""
    return float(value) if math.isfinite(value) else -9999.0


_BYTE_DECODER: dict[str, int] = {}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: each byte is written as one printable character."""
    if not _BYTE_DECODER:
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        chars = list(printable)
        extra = 0
        for byte in range(256):
            if byte not in printable:
                printable.append(byte)
                chars.append(256 + extra)
                extra += 1
        _BYTE_DECODER.update({chr(c): b for b, c in zip(printable, chars)})
    return _BYTE_DECODER


class TokenText:
    """Bytes and text of single tokens, for logprobs (cached: the vocabulary is fixed)."""

    _HEX_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.byte_level = tokenizer is not None and "ByteLevel" in repr(tokenizer.backend.decoder)
        self._cache: dict[int, bytes] = {}

    def bytes(self, token_id: int, skip_special: bool = True) -> bytes:
        """The token's bytes; special tokens (EOS, end of turn) are empty when skipped, as in the text."""
        if skip_special and self.tokenizer is not None and token_id in self.tokenizer.special_token_ids:
            return b""
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._bytes(token_id)
        return cached

    def text(self, token_id: int, skip_special: bool = True) -> str:
        return self.bytes(token_id, skip_special).decode("utf-8", errors="replace")

    def _bytes(self, token_id: int) -> bytes:
        if self.tokenizer is None:  # a token-ids-only engine: name the id, as vLLM does
            return f"token_id:{token_id}".encode()
        piece = self.tokenizer.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self.tokenizer.special_token_ids:
            return piece.encode()
        if self.byte_level:
            decoder = _byte_decoder()
            if all(c in decoder for c in piece):
                return bytes(decoder[c] for c in piece)
            return piece.encode()
        match = self._HEX_BYTE.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace("\u2581", " ").encode()


def chat_logprobs(text: TokenText, logprobs: list, top: int, skip_special: bool) -> list[dict]:
    """A chat completion's (or chunk's) `logprobs.content`: each token with its `top` alternatives."""
    def entry(token_id: int, logprob: float) -> dict:
        token_bytes = text.bytes(token_id, skip_special)
        return {"token": token_bytes.decode("utf-8", errors="replace"), "logprob": _finite(logprob),
                "bytes": list(token_bytes)}

    return [{**entry(item.token_id, item.logprob), "top_logprobs": [entry(t, lp) for t, lp in item.top[:top]]}
            for item in logprobs or []]


def echoed_completion_logprobs(text: TokenText, prompt_ids: list[int], prompt_logprobs: list, logprobs: list, k: int,
                               skip_special: bool, completion_offset: int) -> tuple[dict, int]:
    """An echoed completion's (or first chunk's) `logprobs`: the prompt's tokens from character 0
    (the first with no logprob: nothing predicts it, so OpenAI reports null), then the
    completion's from `completion_offset` (where its text starts after the echoed prompt); and
    the offset after them."""
    first = text.text(prompt_ids[0], skip_special)
    prompt, _ = completion_logprobs(text, prompt_logprobs[1:], k, skip_special, len(first))
    completion, offset = completion_logprobs(text, logprobs, k, skip_special, completion_offset)
    firsts = {"tokens": first, "token_logprobs": None, "top_logprobs": None, "text_offset": 0}
    return {key: [value, *prompt[key], *completion[key]] for key, value in firsts.items()}, offset


def completion_logprobs(text: TokenText, logprobs: list, k: int, skip_special: bool, offset: int) -> tuple[dict, int]:
    """A text completion's (or chunk's) `logprobs`, its tokens starting at character `offset` of the
    choice's text; and the offset after them."""
    result = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for item in logprobs or []:
        token = text.text(item.token_id, skip_special)
        result["tokens"].append(token)
        result["token_logprobs"].append(_finite(item.logprob))
        top = {text.text(t, skip_special): _finite(lp) for t, lp in item.top[:k]}
        top.setdefault(token, _finite(item.logprob))
        result["top_logprobs"].append(top)
        result["text_offset"].append(offset)
        offset += len(token)
    return result, offset
