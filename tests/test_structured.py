"""Structured output building blocks: constraints are checked and keyed canonically, compiled
grammars are cached, matchers advance, mask, validate drafts and roll back exactly, and masks
reach the logits as -inf."""
from __future__ import annotations

import json

import pytest
import torch

from quill.errors import InvalidRequestError, StructuredOutputError
from quill.sampling_params import SamplingParams
from quill.structured.compiler import GrammarCompiler
from quill.structured.constraints import constraint_from_fields, json_schema_constraint
from quill.structured.masks import TokenMasks
from quill.structured.matcher import fill_masks, mask_words
from quill.structured.stats import Histogram
from quill.tokenizer import Tokenizer
from tokenizer_helpers import tiny_sentencepiece_metadata, tiny_text_ids

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["name", "age"], "additionalProperties": False}
MODEL_VOCAB = 320  # the tiny models' logits are wider than the tiny tokenizer's 278 tokens


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(tiny_sentencepiece_metadata())


@pytest.fixture()
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, MODEL_VOCAB, cache_size=2)


def _allowed(matcher, vocab: int = MODEL_VOCAB) -> set[int]:
    bits = torch.zeros(mask_words(vocab), dtype=torch.int32)
    matcher.fill_mask(bits)
    return set(TokenMasks([0], bits[None]).allowed(vocab)[0].nonzero().flatten().tolist())


def _params(**constraint) -> SamplingParams:
    return SamplingParams(**constraint)


# ------------------------------------------------------------------------------ constraints
@pytest.mark.parametrize("fields, param, words", [
    ({"json_schema": {"type": "strng"}}, "json_schema", "invalid"),
    ({"json_schema": {"type": "array", "uniqueItems": True}}, "json_schema", "does not support"),
    ({"json_schema": {"type": "integer", "not": {"const": 3}}}, "json_schema", "does not support"),
    ({"json_schema": {"type": "integer", "minimum": 5, "maximum": 1}}, "json_schema", "invalid"),
    ({"json_schema": {"$ref": "#/$defs/missing"}}, "json_schema", "invalid"),
    ({"json_schema": "{not json"}, "json_schema", "not valid JSON"),
    ({"json_schema": [1, 2]}, "json_schema", "must be a JSON Schema object"),
    ({"regex": "[a-"}, "regex", "invalid"),
    ({"regex": ""}, "regex", "non-empty"),
    ({"choice": []}, "choice", "non-empty list"),
    ({"choice": ["a", 3]}, "choice", "non-empty strings"),
    ({"choice": "ab"}, "choice", "non-empty list"),
    ({"grammar": "start: undefined_rule"}, "grammar", "invalid"),
    ({"regex": "a", "choice": ["a"]}, "choice", "cannot be combined"),
    ({"json_object": True, "json_schema": {"type": "object"}}, "json_object", "cannot be combined"),
])
def test_bad_constraints_name_their_field(fields, param, words):
    with pytest.raises(StructuredOutputError, match=words) as caught:
        _params(**fields)
    assert caught.value.param == param
    assert isinstance(caught.value, InvalidRequestError)  # the server's 400 path
    assert str(caught.value).startswith(param.split(".")[0]) or "combined" in str(caught.value)


def test_ignore_eos_cannot_be_honoured_with_a_grammar():
    with pytest.raises(InvalidRequestError, match="ignore_eos"):
        SamplingParams(regex="a+", ignore_eos=True)


def test_canonical_key_ignores_spacing_but_keeps_property_order():
    a = json_schema_constraint({"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}})
    b = json_schema_constraint('{"type": "object",\n  "properties": {"x": {"type":"integer"}, "y": {"type": "integer"}}}')
    assert a.key == b.key and a.grammar == b.grammar
    reordered = json_schema_constraint({"type": "object", "properties": {"y": {"type": "integer"}, "x": {"type": "integer"}}})
    assert reordered.key != a.key  # the output writes properties in schema order
    assert constraint_from_fields() is None
    assert constraint_from_fields(json_object=True).kind == "json_object"
    assert SamplingParams(choice=["x"]).constraint.kind == "choice"
    assert SamplingParams().constraint is None


def test_gbnf_grammars_are_accepted_as_well_as_lark(tokenizer, compiler):
    gbnf = 'root ::= "yes" | "no"'
    lark = 'start: "yes" | "no"'
    for grammar in (gbnf, lark):
        (matcher,) = compiler.matchers(SamplingParams(grammar=grammar).constraint)
        assert all(matcher.advance(t) for t in tiny_text_ids(tokenizer, "no")) and matcher.is_terminated


# --------------------------------------------------------------------------------- compiler
def test_grammar_cache_hits_and_lru_bound(compiler):
    person, ints, choice = (SamplingParams(json_schema=PERSON).constraint, SamplingParams(regex=r"\d+").constraint,
                            SamplingParams(choice=["a", "b"]).constraint)
    compiler.matchers(person)
    compiler.matchers(person, 3)
    assert (compiler.hits, compiler.misses) == (1, 1)
    compiler.matchers(ints)
    compiler.matchers(choice)  # the cache holds 2: person, the least recently used, is evicted
    compiler.matchers(person)
    assert (compiler.hits, compiler.misses) == (1, 4)
    assert compiler.compile_seconds > 0


def test_copies_from_the_cache_are_independent(tokenizer, compiler):
    constraint = SamplingParams(json_schema=PERSON).constraint
    first, second = compiler.matchers(constraint, 2)
    for token in tiny_text_ids(tokenizer, '{"name": "'):
        assert first.advance(token)
    assert _allowed(second) == _allowed(compiler.matchers(constraint)[0])  # still at the start


# ---------------------------------------------------------------------------------- matcher
def test_matcher_follows_a_json_schema(tokenizer, compiler):
    (matcher,) = compiler.matchers(SamplingParams(json_schema=PERSON).constraint)
    text = json.dumps({"name": "Hello", "age": 7})
    for token in tiny_text_ids(tokenizer, text):
        assert token in _allowed(matcher)
        assert matcher.advance(token)
    assert matcher.is_accepting and matcher.is_terminated
    assert _allowed(matcher) <= tokenizer.eos_token_ids  # only EOS may follow a complete object


def test_mask_never_allows_tokens_past_the_tokenizer(tokenizer, compiler):
    (matcher,) = compiler.matchers(SamplingParams(regex="(?s:.*)").constraint)
    allowed = _allowed(matcher)
    assert allowed and max(allowed) < tokenizer.vocab_size
    assert not allowed & tokenizer.special_token_ids - tokenizer.eos_token_ids


def test_eos_only_where_the_grammar_accepts(tokenizer, compiler):
    (matcher,) = compiler.matchers(SamplingParams(regex=r"[0-9]{1,3}").constraint)
    eos = tokenizer.eos_token_ids
    assert not _allowed(matcher) & eos
    matcher.advance(tiny_text_ids(tokenizer, "7")[0])
    assert matcher.is_accepting and not matcher.is_terminated and _allowed(matcher) & eos


def test_valid_prefix_and_rollback(tokenizer, compiler):
    (matcher,) = compiler.matchers(SamplingParams(json_schema=PERSON).constraint)
    good = tiny_text_ids(tokenizer, '{"name": "He"')  # then "}": age is missing
    assert matcher.valid_prefix(good + tiny_text_ids(tokenizer, "}")) == len(good)  # nothing consumed
    before = _allowed(matcher)
    masks_along = []
    for token in good:
        masks_along.append(_allowed(matcher))
        matcher.advance(token)
    matcher.rollback(3)
    assert _allowed(matcher) == masks_along[-3]
    matcher.reset()
    assert _allowed(matcher) == before


def test_fill_masks_for_drafts_leaves_the_matchers_where_they_were(tokenizer, compiler):
    person = SamplingParams(json_schema=PERSON).constraint
    first, second = compiler.matchers(person, 2)
    drafts = tiny_text_ids(tokenizer, '{"name"') + tiny_text_ids(tokenizer, "}") + tiny_text_ids(tokenizer, "ll")  # '}' is invalid here
    rows = torch.full((2 + len(drafts) + 1, mask_words(MODEL_VOCAB)), -1, dtype=torch.int32)
    fill_masks([(first, 0, []), (second, 1, drafts)], rows)
    valid = second.valid_prefix(drafts)
    assert valid == len(tiny_text_ids(tokenizer, '{"name"'))
    allowed = TokenMasks(list(range(len(rows))), rows).allowed(MODEL_VOCAB)
    expected = compiler.matchers(person)[0]
    assert set(allowed[0].nonzero().flatten().tolist()) == _allowed(expected)
    for j in range(valid + 1):  # row 1 + j: the mask after j drafts, as plain decoding sees it
        assert set(allowed[1 + j].nonzero().flatten().tolist()) == _allowed(expected)
        if j < valid:
            expected.advance(drafts[j])
    assert allowed[2 + valid:].all()  # past the rejected draft: untouched (never read)
    assert second.valid_prefix(drafts) == valid and _allowed(second) == _allowed(first)  # rolled back


# ------------------------------------------------------------------------------------ masks
def test_masks_set_disallowed_logits_to_minus_infinity():
    logits = torch.randn(3, 70)
    bits = torch.zeros(1, mask_words(70), dtype=torch.int32)
    bits[0, 0] = 0b1010  # tokens 1 and 3
    bits[0, 2] = 1 << 1  # token 65
    masked = TokenMasks([1], bits).apply(logits)
    assert torch.equal(masked[[0, 2]], logits[[0, 2]])  # unconstrained rows untouched
    finite = torch.isfinite(masked[1]).nonzero().flatten().tolist()
    assert finite == [1, 3, 65] and torch.equal(masked[1, finite], logits[1, finite])
    assert torch.isfinite(logits).all()  # the input is not modified


def test_sign_bit_of_a_mask_word_is_token_31():
    bits = torch.tensor([[-(1 << 31)]], dtype=torch.int32)  # only bit 31 set
    assert TokenMasks([0], bits).allowed(32)[0].nonzero().flatten().tolist() == [31]


def test_histogram_is_cumulative_like_prometheus():
    histogram = Histogram((1.0, 2.0, float("inf")))
    histogram.observe(0.5)
    histogram.observe(1.5, times=2)
    histogram.observe(9.0)
    assert histogram.cumulative() == ((1.0, 1), (2.0, 3), (float("inf"), 4))
    assert (histogram.count, histogram.sum) == (4, 0.5 + 3.0 + 9.0)


# ------------------------------------------------------------------------------- real models
@pytest.mark.real_model
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_llguidance_sees_the_real_tokenizers_bytes(model, request):
    """The matcher's view of every token must be the tokenizer's own: text encoded by Quill's
    tokenizer is accepted by a regex that matches exactly that text."""
    from tokenizer_helpers import quill_tokenizer

    tokenizer = quill_tokenizer(request.getfixturevalue(f"{model}_gguf"))
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size)
    text = 'Héllo wörld, 日本語 {"a": [1, 2.5e-3]}\n\tend — ✓'
    escaped = "".join(f"\\x{{{ord(c):x}}}" for c in text)
    (matcher,) = compiler.matchers(SamplingParams(regex=escaped).constraint)
    assert all(matcher.advance(t) for t in tokenizer.encode(text, add_special_tokens=False))
    assert matcher.is_accepting
