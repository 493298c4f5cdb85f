"""Tokenizers shared by the tokenizer, chat-template and detokenizer tests.

Building them is slow (Gemma's vocabulary has 262,144 tokens: ~10 s for Quill, ~20 s for
transformers), so each is built once per test session, whichever test module asks first.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from quill.tokenizer import Tokenizer, load_tokenizer


@lru_cache(maxsize=None)
def quill_tokenizer(gguf_path: Path) -> Tokenizer:
    return load_tokenizer(gguf_path)


@lru_cache(maxsize=None)
def reference_tokenizer(gguf_path: Path):
    """transformers' own tokenizer for the same GGUF file: the reference Quill must match."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def tiny_sentencepiece_metadata(**overrides):
    """A Llama-style SentencePiece vocabulary: <unk> <s> </s>, 256 byte tokens, then pieces."""
    pieces = ["▁", "H", "e", "l", "o", "w", "r", "d", "▁H", "▁He", "ll", "llo", "▁Hello", "▁w", "or", "▁wor", "ld", "▁world", "  "]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) - 1) + [4]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        **overrides,
    }


def tiny_text_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """`text` in the tiny SentencePiece vocabulary one byte at a time, exactly (no space put in
    front, as encoding would): the single-letter piece where there is one ("▁" for a space), else
    the byte token (<0x00> is id 3). Grammar matchers accept one token per byte string: the piece,
    not its <0xNN> fallback."""
    pieces = {chr(byte): tokenizer.backend.token_to_id(chr(byte)) for byte in range(128)} | {" ": 259}
    return [pieces.get(chr(byte)) or 3 + byte for byte in text.encode()]
