"""Incremental detokenizer: streamed text equals the full decode, UTF-8 safety, stop strings."""
from __future__ import annotations

import random

import pytest

from quill.engine.detokenizer import IncrementalDetokenizer
from quill.tokenizer import Tokenizer
from tokenizer_helpers import quill_tokenizer, tiny_sentencepiece_metadata

TEXTS = [
    "Hello world! This is a test of streaming.",
    "Emoji 😀🎉 and families 👩‍👩‍👧‍👦, flags 🇫🇷, skin tones 👍🏽.",
    "中文测试，日本語のテキスト、한국어 텍스트. Café naïve résumé.",
    "def f(x):\n    return x ** 2  # square\n\n\n\tindented\ttabs",
    "  leading spaces and trailing  ",
]


def stream(detokenizer: IncrementalDetokenizer, ids) -> list[str]:
    """Every piece the detokenizer emits for `ids`, the flush included."""
    return [detokenizer.add(i) for i in ids] + [detokenizer.flush()]


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def tokenizer(request, smollm2_gguf, gemma3_gguf) -> Tokenizer:
    return quill_tokenizer({"smollm2": smollm2_gguf, "gemma3": gemma3_gguf}[request.param])


def byte_token_ids(tokenizer: Tokenizer, data: bytes) -> list[int]:
    """Ids that spell `data` one byte per token (SentencePiece <0xNN>, or byte-level BPE letters)."""
    vocab = tokenizer.backend.get_vocab()
    if "<0x41>" in vocab:
        return [vocab[f"<0x{b:02X}>"] for b in data]
    return [vocab[BYTE_LETTERS[b]] for b in data]


def _gpt2_byte_letters() -> dict[int, str]:
    """GPT-2's printable spelling of each byte, which byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}


BYTE_LETTERS = _gpt2_byte_letters()


# -- the stream equals the full decode ----------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_sequences_stream_to_full_decode(tokenizer, skip_special_tokens):
    rng = random.Random(7)
    for _ in range(200):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 40))]
        detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip_special_tokens)
        pieces = stream(detok, ids)
        full = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(pieces) == detok.text == full, ids
        if "\ufffd" not in full:
            assert not any("\ufffd" in piece for piece in pieces), ids


@pytest.mark.real_model
def test_real_text_streams_without_replacement_characters(tokenizer):
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        pieces = stream(IncrementalDetokenizer(tokenizer, []), ids)
        assert "".join(pieces) == tokenizer.decode(ids) == text
        assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.real_model
def test_prompt_context_keeps_the_leading_space(tokenizer):
    prompt = tokenizer.encode("The answer is", add_special_tokens=False)
    ids = tokenizer.encode("The answer is forty two", add_special_tokens=False)[len(prompt):]
    pieces = stream(IncrementalDetokenizer(tokenizer, prompt), ids)
    assert "".join(pieces) == " forty two"


def test_space_stripping_decoder_keeps_spaces_between_tokens():
    # Llama's SentencePiece decoder strips the first token's leading space, so "▁world" decoded
    # alone is "world"; streamed after "Hello" it must be " world".
    tok = Tokenizer.from_gguf_metadata(tiny_sentencepiece_metadata())
    hello, world = tok.encode("Hello", add_special_tokens=False)[0], tok.encode("world", add_special_tokens=False)[0]
    assert tok.decode([world]) == "world"
    assert stream(IncrementalDetokenizer(tok, [tok.bos_token_id, hello]), [world]) == [" world", ""]
    assert stream(IncrementalDetokenizer(tok, [tok.bos_token_id]), [hello, world, world]) == ["Hello", " world", " world", ""]


@pytest.mark.real_model
def test_character_split_into_single_bytes_is_held_until_complete(tokenizer):
    hello = tokenizer.encode("Hi", add_special_tokens=False)
    ids = hello + byte_token_ids(tokenizer, "中😀".encode()) + hello
    pieces = stream(IncrementalDetokenizer(tokenizer, []), ids)
    n = len(hello)
    assert pieces[n:n + 7] == ["", "", "中", "", "", "", "😀"]
    assert "".join(pieces) == "Hi中😀Hi"


@pytest.mark.real_model
def test_invalid_bytes_become_replacement_characters_only_at_the_end(tokenizer):
    ids = tokenizer.encode("ok", add_special_tokens=False) + byte_token_ids(tokenizer, "中".encode()[:2])
    detok = IncrementalDetokenizer(tokenizer, [])
    assert "".join(detok.add(i) for i in ids) == "ok"  # the incomplete character is held
    tail = detok.flush()
    assert "\ufffd" in tail and detok.text == tokenizer.decode(ids)


@pytest.mark.real_model
def test_long_run_of_invalid_bytes_stays_a_small_window(tokenizer):
    # Lone continuation bytes never complete a character; the window must not grow with them.
    ids = byte_token_ids(tokenizer, b"\x80" * 200 + "中".encode())
    detok = IncrementalDetokenizer(tokenizer, [])
    pieces = stream(detok, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert "".join(pieces[:200]).count("\ufffd") >= 190  # released as the run goes, not at its end
    assert len(detok._token_ids) < 16  # internal, but it is the O(1)-per-token guarantee


@pytest.mark.real_model
def test_special_tokens_skipped_or_kept(tokenizer):
    special = min(tokenizer.eos_token_ids)
    ids = tokenizer.encode("a", add_special_tokens=False) + [special] + tokenizer.encode(" b", add_special_tokens=False)
    assert "".join(stream(IncrementalDetokenizer(tokenizer, []), ids)) == "a b"
    kept = "".join(stream(IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False), ids))
    assert kept == tokenizer.decode(ids, skip_special_tokens=False) != "a b"


# -- stop strings -------------------------------------------------------------------------------------


def run_with_stop(tokenizer, text, stop, include=False):
    """(pieces, detokenizer) after streaming `text` until one of the stop strings."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], stop=stop, include_stop_str_in_output=include)
    pieces = []
    for token_id in ids:
        pieces.append(detok.add(token_id))
        # Not even part of a stop string may be sent before the stop is known (or ruled out).
        assert not any(s in "".join(pieces) for s in stop) or include
        if detok.stopped:
            break
    else:
        pieces.append(detok.flush())
    return pieces, detok


@pytest.mark.real_model
def test_stop_string_spanning_tokens(tokenizer):
    text = "Hello world. The end of the story."
    pieces, detok = run_with_stop(tokenizer, text, ["d. Th"])
    assert detok.stopped and detok.text == "".join(pieces) == "Hello worl"
    assert detok.add(tokenizer.encode("more", add_special_tokens=False)[0]) == ""  # stays stopped
    assert detok.flush() == ""


@pytest.mark.real_model
def test_stop_string_included(tokenizer):
    _, detok = run_with_stop(tokenizer, "Hello world. The end.", ["world"], include=True)
    assert detok.stopped and detok.text == "Hello world"


@pytest.mark.real_model
def test_earliest_stop_string_wins(tokenizer):
    _, detok = run_with_stop(tokenizer, "one two three four", ["four", "two", "wo t"])
    assert detok.text == "one "


@pytest.mark.real_model
def test_partial_stop_string_is_held_then_released(tokenizer):
    text = "Say hello worl"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], stop=["world!"])
    sent = "".join(detok.add(i) for i in ids)
    assert sent == "Say hello "  # "worl" could still become "world!"
    assert detok.flush() == "worl" and not detok.stopped and detok.text == text


@pytest.mark.real_model
def test_random_stop_strings(tokenizer):
    rng = random.Random(3)
    for _ in range(100):
        text = rng.choice(TEXTS)
        start = rng.randrange(len(text) - 1)
        stop = text[start:start + rng.randint(1, 6)]
        expected = text[:text.index(stop)]
        pieces, detok = run_with_stop(tokenizer, text, [stop])
        assert detok.stopped and detok.text == "".join(pieces) == expected, stop


@pytest.mark.real_model
def test_stop_string_inside_a_multibyte_run(tokenizer):
    text = "Emoji 😀🎉 done"
    pieces, detok = run_with_stop(tokenizer, text, ["🎉"])
    assert detok.text == "Emoji 😀" and not any("\ufffd" in p for p in pieces)
