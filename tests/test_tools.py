"""Tool calling building blocks: tool_choice grammars force valid calls, the native formats
parse, streamed deltas join to the non-streamed message, and chat templates get tools (or the
fallback prompt)."""
from __future__ import annotations

import json
import random

import jsonschema
import pytest

from engine_helpers import tiny_text_engine
from quill.errors import ChatTemplateError, StructuredOutputError
from quill.sampling_params import SamplingParams
from quill.structured.compiler import GrammarCompiler
from quill.structured.tool_calls import ToolCall, ToolCallParser, join_deltas, parse_tool_calls
from quill.structured.tool_messages import messages_for_template
from quill.structured.tools import check_tools, detect_tool_format, tool_choice_grammar
from quill.tokenizer import Tokenizer
from tokenizer_helpers import tiny_sentencepiece_metadata, tiny_text_ids

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def _ids(i: int) -> str:
    return f"call_{i}"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(tiny_sentencepiece_metadata())


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, 320)


def _accepts(compiler, tokenizer, grammar: str, text: str) -> bool:
    """Whether the grammar takes exactly `text` as a complete output."""
    (matcher,) = compiler.matchers(SamplingParams(grammar=grammar).constraint)
    ids = tiny_text_ids(tokenizer, text)
    return matcher.valid_prefix(ids) == len(ids) and all(matcher.advance(t) for t in ids) and matcher.is_accepting


# ---------------------------------------------------------------------------------- tools
@pytest.mark.parametrize("tools, param", [
    ([], "tools"),
    ("get_weather", "tools"),
    ([{"type": "retrieval"}], "tools[0]"),
    ([{"type": "function"}], "tools[0].function"),
    ([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name"),
    ([WEATHER, WEATHER], "tools[1].function.name"),
    ([WEATHER, {"type": "function", "function": {"name": "u", "parameters": {"type": "array", "uniqueItems": True}}}],
     "tools[1].function.parameters"),
    ([{"type": "function", "function": {"name": "u", "parameters": {"type": "objekt"}}}], "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "u", "parameters": {"type": "string"}}}], "tools[0].function.parameters"),
])
def test_bad_tools_name_the_field(tools, param):
    with pytest.raises(StructuredOutputError) as caught:
        check_tools(tools)
    assert caught.value.param == param


def test_tool_choice_must_name_a_known_function():
    with pytest.raises(StructuredOutputError, match="not among the tools") as caught:
        tool_choice_grammar(TOOLS, {"type": "function", "function": {"name": "get_time"}})
    assert caught.value.param == "tool_choice"
    with pytest.raises(StructuredOutputError) as caught:
        tool_choice_grammar(TOOLS, "sometimes")
    assert caught.value.param == "tool_choice"
    assert tool_choice_grammar(TOOLS, "none") is None


def test_tool_without_parameters_takes_an_empty_object():
    (tool,) = check_tools([{"type": "function", "function": {"name": "now"}}])
    assert tool.parameters == {"type": "object", "properties": {}}


# ------------------------------------------------------------------------------- grammars
def _call(name: str, arguments: dict, key: str = "arguments") -> str:
    return json.dumps({"name": name, key: arguments})


HERMES_CALL = f"<tool_call>\n{_call('get_weather', {'city': 'Paris', 'unit': 'c'})}\n</tool_call>"
HERMES_ADD = f"<tool_call>\n{_call('add', {'a': 1, 'b': 2})}\n</tool_call>"


@pytest.mark.parametrize("text, required, parallel, named", [
    (HERMES_CALL, True, True, True),
    (HERMES_CALL + "\n" + HERMES_ADD, True, True, False),  # named: only get_weather
    (f"<tool_call>\n{_call('get_weather', {'city': 'Paris'})}\n</tool_call>", False, False, False),  # unit missing
    (f"<tool_call>\n{_call('get_weather', {'city': 'Paris', 'unit': 'k'})}\n</tool_call>", False, False, False),
    (f"<tool_call>\n{_call('get_time', {})}\n</tool_call>", False, False, False),  # unknown function
    ("The weather is fine.", False, False, False),  # required: a call, not text
])
def test_required_and_named_grammars_force_valid_calls(compiler, tokenizer, text, required, parallel, named):
    parallel_ok = required and parallel
    assert _accepts(compiler, tokenizer, tool_choice_grammar(TOOLS, "required"), text) == required
    single_ok = required and "\n<tool_call>" not in text
    assert _accepts(compiler, tokenizer, tool_choice_grammar(TOOLS, "required", parallel_tool_calls=False),
                    text) == single_ok
    assert parallel_ok or not parallel
    named_grammar = tool_choice_grammar(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert _accepts(compiler, tokenizer, named_grammar, text) == named


@pytest.mark.parametrize("text, accepted", [
    ("The weather is fine.", True),
    ("", True),
    ("Let me look.\n" + HERMES_CALL, True),
    (HERMES_CALL + HERMES_ADD, True),
    ("Let me look. <tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>", False),
    ("Text with <tool_call> but no call", False),  # once the opener is written, a call must follow
])
def test_auto_grammar_allows_text_or_valid_calls(compiler, tokenizer, text, accepted):
    assert _accepts(compiler, tokenizer, tool_choice_grammar(TOOLS, "auto"), text) == accepted


@pytest.mark.parametrize("tool_format, required_text, bad_text, auto_text", [
    ("llama3_json", _call("add", {"a": 1, "b": 2}, "parameters") + "; " + _call("add", {"a": 3, "b": 4}, "parameters"),
     _call("add", {"a": 1}, "parameters"), "It is sunny."),
    ("mistral", "[TOOL_CALLS]" + json.dumps([{"name": "add", "arguments": {"a": 1, "b": 2}}]),
     "[TOOL_CALLS]" + json.dumps([{"name": "add", "arguments": {"a": "1", "b": 2}}]), "It is sunny."),
])
def test_other_formats_grammars(compiler, tokenizer, tool_format, required_text, bad_text, auto_text):
    required = tool_choice_grammar(TOOLS, "required", tool_format=tool_format)
    auto = tool_choice_grammar(TOOLS, "auto", tool_format=tool_format)
    assert _accepts(compiler, tokenizer, required, required_text)
    assert not _accepts(compiler, tokenizer, required, bad_text)
    assert not _accepts(compiler, tokenizer, required, auto_text)
    assert _accepts(compiler, tokenizer, auto, auto_text) and _accepts(compiler, tokenizer, auto, required_text)
    assert not _accepts(compiler, tokenizer, auto, bad_text)


def test_detect_tool_format_from_the_template():
    assert detect_tool_format("{{ '<tool_call>' }}") == "hermes"
    assert detect_tool_format("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_tool_format("{% if message.role == 'ipython' %}") == "llama3_json"
    assert detect_tool_format(None) == "hermes"


# -------------------------------------------------------------------------------- parsing
PARSE_CASES = [
    ("hermes", "Sure.\n" + HERMES_CALL + "\n" + HERMES_ADD + "\n", "Sure.",
     [("get_weather", {"city": "Paris", "unit": "c"}), ("add", {"a": 1, "b": 2})]),
    ("hermes", "No tools needed: 2 + 2 = 4.\n", "No tools needed: 2 + 2 = 4.\n", []),
    ("hermes", "I think <tool_call> is a tag name.", "I think <tool_call> is a tag name.", []),
    ("hermes", '<tool_call>{"arguments": {"a": 5, "b": 6}, "name": "add"}</tool_call>', None,
     [("add", {"a": 5, "b": 6})]),  # name after the arguments: sent once known
    ("llama3_json", _call("add", {"a": 1, "b": 2}, "parameters") + "; " + _call("get_weather", {"city": "Rome", "unit": "f"}, "parameters"),
     None, [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Rome", "unit": "f"})]),
    ("llama3_json", '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', None, [("add", {"a": 1, "b": 2})]),
    ("llama3_json", "Rome is {sunny} today.", "Rome is {sunny} today.", []),
    ("mistral", 'Checking. [TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}, '
                '{"name": "get_weather", "arguments": {"city": "N}Y", "unit": "c"}}]', "Checking.",
     [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "N}Y", "unit": "c"})]),
]


@pytest.mark.parametrize("tool_format, text, content, calls", PARSE_CASES)
def test_native_formats_parse(tool_format, text, content, calls):
    message = parse_tool_calls(text, tool_format, _ids)
    assert message.content == content
    assert [(c.name, json.loads(c.arguments)) for c in message.tool_calls] == calls
    assert [c.id for c in message.tool_calls] == [_ids(i) for i in range(len(calls))]
    assert message.finish_reason == ("tool_calls" if calls else None)


@pytest.mark.parametrize("tool_format, text, content, calls", PARSE_CASES)
@pytest.mark.parametrize("chunking", ["chars", "random"])
def test_streamed_deltas_join_to_the_parsed_message(tool_format, text, content, calls, chunking):
    rng = random.Random(len(text))
    pieces, at = [], 0
    while at < len(text):
        size = 1 if chunking == "chars" else rng.randint(1, 12)
        pieces.append(text[at:at + size])
        at += size
    parser = ToolCallParser(tool_format, _ids)
    deltas = [delta for piece in pieces for delta in parser.feed(piece)] + parser.finish()
    assert join_deltas(deltas) == parse_tool_calls(text, tool_format, _ids)
    seen = set()
    for delta in deltas:
        assert set(delta) in ({"content"}, {"tool_calls"})
        for call in delta.get("tool_calls", ()):
            if call["index"] not in seen:  # OpenAI's order: index, id, type and name first
                assert call["id"] == _ids(call["index"]) and call["type"] == "function"
                assert call["function"]["name"] and call["function"]["arguments"] == ""
                seen.add(call["index"])
            else:
                assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}


def test_arguments_arrive_in_pieces_as_they_are_written():
    parser = ToolCallParser("hermes", _ids)
    deltas = parser.feed('<tool_call>\n{"name": "add", "arguments": {"a": 1')
    assert [d["tool_calls"][0]["function"] for d in deltas] == [{"name": "add", "arguments": ""}, {"arguments": '{"a": 1'}]
    assert parser.feed(', "b": 2}}\n</tool_call>') == [{"tool_calls": [{"index": 0, "function": {"arguments": ', "b": 2}'}}]}]


def test_a_call_cut_off_keeps_what_was_written():
    message = parse_tool_calls('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b"', "hermes", _ids)
    assert message.tool_calls == [ToolCall("call_0", "add", '{"a": 1, "b"')] and message.content is None


@pytest.mark.parametrize("tool_format, text, content, calls", [
    ("hermes", "<tool_call>", None, 0),
    ("hermes", 'Sure.\n<tool_call>\n{"name": "get_', "Sure.", 0),
    ("hermes", HERMES_CALL + '\n<tool_call>\n{"name": "ad', None, 1),
    ("mistral", "Checking. [TOOL_CALLS]", "Checking.", 0),
    ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, {"na', None, 1),
    ("llama3_json", '{"name": "get_w', None, 0),
])
def test_a_call_cut_off_before_its_name_is_dropped(tool_format, text, content, calls):
    """Output cut (max_tokens, a stop string) inside a call's opening leaves no markup in the
    content, streamed or not: it was the start of a call, and a call without a name is none."""
    message = parse_tool_calls(text, tool_format, _ids)
    assert message.content == content and len(message.tool_calls) == calls
    parser = ToolCallParser(tool_format, _ids)
    deltas = [delta for char in text for delta in parser.feed(char)] + parser.finish()
    assert join_deltas(deltas) == message


# -------------------------------------------------------------------- generation round trip
SMALL_ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}


@pytest.mark.parametrize("tool_choice, sampling", [("required", {"temperature": 0}),
                                                   ({"type": "function", "function": {"name": "add"}},
                                                    {"temperature": 1.0, "seed": 4})])
def test_constrained_generation_parses_into_valid_calls(tiny_model_dir, tool_choice, sampling):
    """Through the engine: the output the grammar forces parses into a valid call (one: a random
    model given parallel calls goes on calling until max_tokens)."""
    engine = tiny_text_engine(tiny_model_dir("llama"))
    tools = [WEATHER, SMALL_ADD]
    grammar = tool_choice_grammar(tools, tool_choice, parallel_tool_calls=False)
    engine.add_request("Hello world", SamplingParams(grammar=grammar, max_tokens=150, **sampling))
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    final = outputs[-1]
    assert final.finish_reason == "stop", final.text
    message = parse_tool_calls(final.text, "hermes", _ids)
    assert len(message.tool_calls) == 1 and message.content is None
    (call,) = message.tool_calls
    jsonschema.validate(json.loads(call.arguments), {t["function"]["name"]: t["function"]["parameters"]
                                                     for t in tools}[call.name])
    assert isinstance(tool_choice, str) or call.name == "add"


# ------------------------------------------------------------------------- chat templates
TOOLS_TEMPLATE = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
                  "{% for m in messages %}{{ m.role }}: {{ m.content or '' }}"
                  "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments.a }}]{% endfor %}\n"
                  "{% endfor %}")
PLAIN_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
HISTORY = [
    {"role": "user", "content": "Add 1 and 2."},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
    {"role": "tool", "tool_call_id": "call_0", "content": "3"},
]


def test_tools_and_tool_calls_reach_a_template_that_supports_them(tokenizer):
    text = tokenizer.apply_chat_template(HISTORY, tools=TOOLS, chat_template=TOOLS_TEMPLATE)
    assert text.startswith("TOOLS:get_weather;add;user: Add 1 and 2.")
    assert "[add 1]" in text  # the JSON-text arguments became an object the template can read
    assert "tool: 3" in text


def test_templates_without_tools_get_the_fallback_prompt(tokenizer):
    text = tokenizer.apply_chat_template(HISTORY, tools=TOOLS, chat_template=PLAIN_TEMPLATE)
    system = text[:text.index("</system>")]
    assert system.startswith("<system># Tools") and '"name": "get_weather"' in system and "<tool_call>" in system
    assert '<assistant><tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call></assistant>' in text
    assert "<user><tool_response>\n3\n</tool_response></user>" in text
    messages, tools = messages_for_template([{"role": "system", "content": "Be brief."}], TOOLS, PLAIN_TEMPLATE)
    assert tools is None and len(messages) == 1 and messages[0]["content"].startswith("Be brief.\n\n# Tools")


def test_conversations_without_tools_are_untouched(tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    assert messages_for_template(messages, None, PLAIN_TEMPLATE) == (messages, None)
    assert tokenizer.apply_chat_template(messages, chat_template=PLAIN_TEMPLATE) == "<user>hi</user>"


@pytest.mark.parametrize("messages, words", [
    ([{"role": "tool", "content": None}], "content"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}], "message 0 tool_calls\\[0\\] must be"),
    ([{"role": "assistant", "content": "x", "tool_calls": "add"}], "message 0 tool_calls must be a list"),
])
def test_bad_tool_messages_are_clear_errors(tokenizer, messages, words):
    for template in (PLAIN_TEMPLATE, TOOLS_TEMPLATE):
        with pytest.raises(ChatTemplateError, match=words):
            tokenizer.apply_chat_template(messages, tools=TOOLS, chat_template=template)


def test_bad_tools_in_a_chat_are_clear_errors(tokenizer):
    with pytest.raises(StructuredOutputError):
        tokenizer.apply_chat_template(HISTORY, tools=[{"type": "function"}], chat_template=PLAIN_TEMPLATE)
