"""Tokenizer parity with transformers on the real GGUF models, plus loading and error paths."""
from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import pre_tokenizers

from quill.errors import ModelLoadError, UnsupportedModelError
from quill.tokenizer import Tokenizer, load_tokenizer
from tokenizer_helpers import quill_tokenizer, reference_tokenizer, tiny_sentencepiece_metadata

HARD_STRINGS = [
    "Hello world",
    "hello",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    " ",
    "\n",
    "a  b   c    d     e",
    "tabs\tand\t\tmore\t\t\ttabs",
    "line1\nline2\n\nline4\n\n\n\nline8\r\nwindows",
    " \n \t \n\t mixed whitespace \t\n",
    "def f(x):\n    if x > 0:\n        return x ** 2  # square\n    return -x\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    '{"key": [1, 2.5, null], "other": "va\\"lue"}',
    "Numbers: 0 7 42 1234567890 3.14159 -17 1e-9 $1,000,000.00 12:30",
    "Emoji: 😀🎉 👩‍👩‍👧‍👦 👍🏽 🇫🇷",
    "中文测试，日本語のテキスト、한국어 텍스트",
    "Café naïve résumé Ñandú façade Ångström Ελληνικά русский",
    "don't can't I'm we'll they're you've he'd IT'S",
    "<table><tr><td>cell</td></tr></table>",
    "x" * 300,
    "\u00a0non-breaking\u200bzero-width\u3000ideographic",
]

# Control tokens written in the text must come out as single special ids.
SPECIAL_STRINGS = {
    "smollm2": ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "a<|endoftext|>b", "<|im_end|><|im_end|>"],
    "gemma3": ["<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "<bos>text<eos>", "x<pad>y"],
}

# Known reference bug (transformers 5.x GGUF loader): it does not know `tokenizer.ggml.pre ==
# "smollm"` and splits words GPT-2 style. llama.cpp (LLAMA_VOCAB_PRE_TYPE_SMOLLM) and SmolLM2's own
# tokenizer.json first split off every numeric character (`\p{N}`), so " ½" is "Ġ" + "Â½" there and
# in Quill, but "ĠÂ" + "½" in the reference. It shows only where a space or newline precedes a
# non-ASCII number (the vocabulary has no multi-digit ASCII tokens). These strings are checked
# against the reference with SmolLM2's real pre-tokenizer restored.
SMOLLM2_NUMERIC_STRINGS = ["x² + y³ = z⁴", "½ cup and ¼ spoon", "Arabic ٣ and Devanagari ४", "{\n ٣}", "rm \r9"]

MODELS = ["smollm2", "gemma3"]


@pytest.fixture(scope="module")
def tokenizers_for(smollm2_gguf, gemma3_gguf):
    """model name -> (Quill tokenizer, transformers reference), each built once per session."""
    paths = {"smollm2": smollm2_gguf, "gemma3": gemma3_gguf}
    return lambda name: (quill_tokenizer(paths[name]), reference_tokenizer(paths[name]))


def _smollm2_fixed_reference(reference) -> BackendTokenizer:
    """The reference backend with SmolLM2's real pre-tokenizer (digits split off, then GPT-2)."""
    fixed = BackendTokenizer.from_str(reference.backend_tokenizer.to_str())
    fixed.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return fixed


@pytest.mark.real_model
@pytest.mark.parametrize("name", MODELS)
def test_encode_matches_transformers(tokenizers_for, name):
    ours, ref = tokenizers_for(name)
    for text in HARD_STRINGS + SPECIAL_STRINGS[name]:
        for add_special in (True, False):
            expected = ref.encode(text, add_special_tokens=add_special)
            assert ours.encode(text, add_special_tokens=add_special) == expected, (text, add_special)


@pytest.mark.real_model
@pytest.mark.parametrize("name", MODELS)
def test_decode_matches_transformers_and_round_trips(tokenizers_for, name):
    ours, ref = tokenizers_for(name)
    for text in HARD_STRINGS + SPECIAL_STRINGS[name]:
        ids = ours.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
        assert ours.decode(ours.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


@pytest.mark.real_model
@pytest.mark.parametrize("name", MODELS)
def test_random_text_matches_transformers(tokenizers_for, name):
    ours, ref = tokenizers_for(name)
    reference = _smollm2_fixed_reference(ref) if name == "smollm2" else ref.backend_tokenizer
    pool = [chr(c) for c in range(32, 127)] + list("\t\n\r  éß中文😀½²٣\u3000\u00a0")
    rng = random.Random(1234)
    for _ in range(500):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 40)))
        assert ours.encode(text) == reference.encode(text).ids, text


@pytest.mark.real_model
def test_smollm2_splits_numbers_like_llama_cpp(tokenizers_for):
    ours, ref = tokenizers_for("smollm2")
    fixed = _smollm2_fixed_reference(ref)
    for text in SMOLLM2_NUMERIC_STRINGS:
        assert ours.encode(text) == fixed.encode(text).ids, text
    assert ours.convert_ids_to_tokens(ours.encode(" ½")) == ["Ġ", "Â½"]
    # Where the unfixed reference differs (see SMOLLM2_NUMERIC_STRINGS): if this starts failing,
    # transformers learned the smollm pre-tokenizer and the strings can join HARD_STRINGS.
    assert ref.convert_ids_to_tokens(ref.encode(" ½", add_special_tokens=False)) == ["ĠÂ", "½"]


@pytest.mark.real_model
def test_smollm2_special_tokens_and_ids(tokenizers_for):
    tok, _ = tokenizers_for("smollm2")
    assert tok.vocab_size == 49152
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[-1] == 2
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)  # add_bos_token is false
    assert not tok.add_bos_token
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    # <|im_end|> is the chat EOS; <|endoftext|> ends documents (llama.cpp stops on both).
    assert tok.eos_token_ids == {0, 2}
    assert {0, 1, 2} <= tok.special_token_ids
    assert tok.decode([1, 2], skip_special_tokens=True) == ""
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


@pytest.mark.real_model
def test_gemma3_special_tokens_and_ids(tokenizers_for):
    tok, _ = tokenizers_for("gemma3")
    assert tok.vocab_size == 262144
    assert tok.add_bos_token
    assert tok.encode("hi")[0] == tok.bos_token_id == 2
    assert tok.encode("hi", add_special_tokens=False)[0] != 2
    assert tok.encode("<start_of_turn>", add_special_tokens=False) == [105]
    assert tok.eos_token_id == 1
    assert tok.eos_token_ids == {1, 106}  # <eos> and <end_of_turn>, as Gemma's generation config
    assert tok.chat_template is None
    # User-defined tokens (newline runs, HTML tags) are whole tokens but ordinary text when decoding.
    assert tok.convert_ids_to_tokens(tok.encode("\n\n", add_special_tokens=False)) == ["\n\n"]
    assert tok.decode(tok.encode("a\n\nb<table>"), skip_special_tokens=True) == "a\n\nb<table>"


@pytest.mark.real_model
@pytest.mark.parametrize("name", MODELS)
def test_from_pretrained_dir_matches_gguf(tokenizers_for, name, tmp_path):
    gguf_tok, ref = tokenizers_for(name)
    ref.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [gguf_tok.eos_token_id, 7]}))
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == gguf_tok.vocab_size
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos_token) == (
        gguf_tok.bos_token_id, gguf_tok.eos_token_id, gguf_tok.add_bos_token)
    assert tok.eos_token_ids == gguf_tok.eos_token_ids | {7}
    assert tok.chat_template == gguf_tok.chat_template
    for text in HARD_STRINGS + SPECIAL_STRINGS[name]:
        assert tok.encode(text) == ref.encode(text), text


@pytest.mark.real_model
def test_tokenizer_config_add_bos_token_overrides_tokenizer_json(tokenizers_for, tmp_path):
    _, ref = tokenizers_for("gemma3")
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    tok = Tokenizer.from_pretrained_dir(tmp_path)
    assert not tok.add_bos_token
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)


# -- small synthetic vocabularies: the SentencePiece paths the real models do not take ---------------


def test_sentencepiece_space_prefix_and_byte_fallback():
    tok = Tokenizer.from_gguf_metadata(tiny_sentencepiece_metadata())  # add_space_prefix defaults on
    ids = tok.encode("Hello world")
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "▁Hello", "▁world"]
    assert tok.decode(ids) == "Hello world"  # the prefix space is stripped again
    # "中" is not in the vocabulary: its three UTF-8 bytes become byte tokens and decode back.
    assert tok.convert_ids_to_tokens(tok.encode("中", add_special_tokens=False)) == ["▁", "<0xE4>", "<0xB8>", "<0xAD>"]
    assert tok.decode(tok.encode("Hello 中")) == "Hello 中"
    # Runs of spaces stored with real spaces are respelled so BPE can produce them.
    assert "▁▁" in tok.convert_ids_to_tokens(tok.encode("Hello  world", add_special_tokens=False))


def test_sentencepiece_without_space_prefix():
    tok = Tokenizer.from_gguf_metadata(tiny_sentencepiece_metadata(**{"tokenizer.ggml.add_space_prefix": False}))
    assert tok.convert_ids_to_tokens(tok.encode("Hello", add_special_tokens=False))[0] == "H"


def test_gguf_metadata_errors():
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        Tokenizer.from_gguf_metadata({"general.architecture": "llama"})
    with pytest.raises(UnsupportedModelError, match="bert"):
        Tokenizer.from_gguf_metadata(tiny_sentencepiece_metadata(**{"tokenizer.ggml.model": "bert"}))


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no tokenizer found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load_tokenizer(tmp_path)  # a directory without tokenizer.json
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not a valid tokenizer"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("text", ["a\ud800b", "caf\udce9"])  # JSON's escape; a byte the shell could not decode
def test_a_lone_surrogate_is_a_clear_error_naming_the_prompt(text):
    from quill.errors import InvalidRequestError

    tokenizer = Tokenizer.from_gguf_metadata(tiny_sentencepiece_metadata())
    with pytest.raises(InvalidRequestError, match="lone surrogate") as caught:
        tokenizer.encode(text)
    assert caught.value.param == "prompt"
    with pytest.raises(InvalidRequestError, match="lone surrogate"):
        tokenizer.encode_chat([{"role": "user", "content": text}], chat_template="{{ messages[0]['content'] }}")
