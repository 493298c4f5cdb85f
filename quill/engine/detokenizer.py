"""Incremental detokenization: a stream of token ids in, a stream of text out, with stop strings.

Decoding each new token on its own is wrong in three ways, and this module handles all three:

- A character can span tokens: byte-level BPE pieces and SentencePiece `<0xNN>` byte tokens can
  end in the middle of a UTF-8 sequence. Such a tail decodes to U+FFFD, so it is held back until
  the character is complete (or, at the end, flushed as U+FFFD because the bytes are invalid).
- Decoders treat the start of the text specially (Llama's SentencePiece decoder strips the leading
  space), so a token decoded alone can lose text. As in vLLM and TGI, we decode a short window of
  recent tokens with and without the new ones and emit the difference: `prefix_offset` is where
  the window starts, `read_offset` where the text already emitted ends.
- Stop strings can span tokens. Text that could be the beginning of a stop string is held back, so
  a client never receives part of a stop string that is then cut from the final text.

Each step decodes a window of a few tokens, so the cost per token does not grow with the output.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded as context for the first generated token (vLLM uses the same number).
_PROMPT_CONTEXT_TOKENS = 5
# A character has at most 4 bytes, so at most 4 tokens; a longer run of held tokens is held by
# invalid bytes. Past this many, all but the last few are released (see _settle_invalid_run).
_MAX_HELD_TOKENS = 8
_HELD_TAIL_TOKENS = 4


class _Decoder(Protocol):
    special_token_ids: frozenset[int]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text deltas; see the module docstring."""

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = [s for s in stop if s]  # an empty stop string would match before any text
        self._include_stop = include_stop_str_in_output
        self._token_ids = [t for t in prompt_token_ids if not self._is_skipped(t)][-_PROMPT_CONTEXT_TOKENS:]
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        self._unsent = ""  # decoded text held back because it may start a stop string
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Take one generated token; return the text that can be sent now (often "")."""
        if self.stopped:
            return ""
        # A skipped special token adds no text and does not change how its neighbours decode
        # (the decoder never sees it), so it need not enter the window at all.
        if not self._is_skipped(token_id):
            self._token_ids.append(token_id)
            self._unsent += self._decode_new_text(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of generation: release everything still held back."""
        if self.stopped:
            return ""
        self._unsent += self._decode_new_text(final=True)
        return self._release(final=True)

    def _is_skipped(self, token_id: int) -> bool:
        return self._skip_special_tokens and token_id in self._tokenizer.special_token_ids

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._token_ids[start:end], skip_special_tokens=self._skip_special_tokens)

    # -- complete characters ----------------------------------------------------------------------

    def _decode_new_text(self, final: bool) -> str:
        settled = ""
        if not final and len(self._token_ids) - self._read_offset > _MAX_HELD_TOKENS:
            settled = self._settle_invalid_run()
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        full_text = self._decode(self._prefix_offset)
        if not final and (len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT)):
            return settled  # nothing new yet, or the text ends in an incomplete character
        self._prefix_offset, self._read_offset = self._read_offset, len(self._token_ids)
        del self._token_ids[: self._prefix_offset]  # keep only the window: memory stays O(1)
        self._read_offset -= self._prefix_offset
        self._prefix_offset = 0
        return settled + full_text[len(prefix_text):]

    def _settle_invalid_run(self) -> str:
        """Release a long run of held tokens (invalid bytes) except its last few tokens.

        The split is taken only if decoding both sides apart gives the same text as decoding them
        together, i.e. no character (valid or not) straddles it, so the final text is unchanged.
        """
        split = len(self._token_ids) - _HELD_TAIL_TOKENS
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        head = self._decode(self._prefix_offset, split)
        if head + self._decode(split) != self._decode(self._prefix_offset) or not head.startswith(prefix_text):
            return ""
        del self._token_ids[:split]
        self._prefix_offset = self._read_offset = 0
        return head[len(prefix_text):]

    # -- stop strings ---------------------------------------------------------------------------

    def _release(self, final: bool) -> str:
        """Send what is decoded, minus any tail that might still become a stop string."""
        stop_at = self._find_stop()
        if stop_at is not None:
            self.stopped = True
            out, self._unsent = self._unsent[:stop_at], ""
        else:
            cut = len(self._unsent) - (0 if final else self._stop_prefix_length())
            out, self._unsent = self._unsent[:cut], self._unsent[cut:]
        self.text += out
        return out

    def _find_stop(self) -> int | None:
        """End of the text to keep if a stop string occurs in the unsent text, else None.

        Text that was sent never ends with the start of a stop string, so a stop string can only
        begin inside the unsent text. The earliest occurrence wins; among those starting at the
        same place, the shortest (it would have been seen first).
        """
        hits = [(index, len(s)) for s in self._stop if (index := self._unsent.find(s)) >= 0]
        if not hits:
            return None
        index, length = min(hits)
        return index + length if self._include_stop else index

    def _stop_prefix_length(self) -> int:
        """Length of the longest suffix of the unsent text that is a proper prefix of a stop string."""
        text = self._unsent
        return max(
            (n for s in self._stop for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
            default=0,
        )
