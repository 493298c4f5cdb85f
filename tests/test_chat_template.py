"""Chat templates: parity with transformers, user templates, errors, and the sandbox."""
from __future__ import annotations

import pytest

from quill.errors import ChatTemplateError
from quill.tokenizer import Tokenizer
from tokenizer_helpers import quill_tokenizer, reference_tokenizer, tiny_sentencepiece_metadata

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "How are you?\n\nTell me  twice."},
    ],
    [
        {"role": "user", "content": "Écris «中文» 😀"},
        {"role": "assistant", "content": "  spaced  "},
        {"role": "user", "content": "<|im_start|> inside content"},
    ],
]

# Templates that exercise the globals and filters real templates use; rendered by both sides.
FEATURE_TEMPLATES = [
    "{{ bos_token }}{% for m in messages %}{{ m | tojson }}{% endfor %}{{ eos_token }}",
    "{{ messages | tojson(indent=2) }}",
    "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
    "{% if tools is none and documents is none %}plain{% endif %}{{ add_generation_prompt }}",
    "{{ strftime_now('%Y') }}",
    "  {% for m in messages %}\n    {{ m.content }}\n  {% endfor %}\n",  # trim_blocks / lstrip_blocks
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return quill_tokenizer(smollm2_gguf), reference_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def gemma3(gemma3_gguf):
    return quill_tokenizer(gemma3_gguf)


@pytest.mark.real_model
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_matches_transformers(smollm2, add_generation_prompt):
    ours, ref = smollm2
    for messages in CONVERSATIONS:
        expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
        assert ours.encode_chat(messages, add_generation_prompt) == ref.encode(expected, add_special_tokens=False)


@pytest.mark.real_model
def test_smollm2_default_system_prompt(smollm2):
    ours, _ = smollm2
    text = ours.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.real_model
@pytest.mark.parametrize("template", FEATURE_TEMPLATES)
def test_template_features_match_transformers(smollm2, template):
    ours, ref = smollm2
    messages = CONVERSATIONS[3]
    expected = ref.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, chat_template=template) == expected


@pytest.mark.real_model
def test_model_without_template_raises_helpful_error(gemma3):
    with pytest.raises(ChatTemplateError, match="no chat template") as info:
        gemma3.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "--chat-template" in str(info.value) and "chat_template=" in str(info.value)
    with pytest.raises(ChatTemplateError):
        gemma3.encode_chat([{"role": "user", "content": "hi"}])


GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
    "{{ m.content }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.mark.real_model
def test_user_template_and_single_bos(gemma3):
    messages = [{"role": "user", "content": "hi"}]
    text = gemma3.apply_chat_template(messages, chat_template=GEMMA_TEMPLATE)
    assert text == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    # The template writes <bos> itself and Gemma adds BOS when encoding: exactly one must remain.
    ids = gemma3.encode_chat(messages, chat_template=GEMMA_TEMPLATE)
    assert ids[0] == gemma3.bos_token_id and ids.count(gemma3.bos_token_id) == 1
    assert ids[1] == 105  # <start_of_turn>, a single special token
    # A template that does not write BOS still gets the one the model wants.
    ids = gemma3.encode_chat(messages, chat_template=GEMMA_TEMPLATE.replace("{{ bos_token }}", ""))
    assert ids[0] == gemma3.bos_token_id and ids.count(gemma3.bos_token_id) == 1


# -- errors and the sandbox: a small synthetic tokenizer is enough ---------------------------------


@pytest.fixture(scope="module")
def tiny():
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    return Tokenizer.from_gguf_metadata(tiny_sentencepiece_metadata(**{"tokenizer.chat_template": template}))


def test_raise_exception_becomes_chat_template_error(tiny):
    template = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with user') }}{% endif %}ok"
    assert tiny.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template) == "ok"
    with pytest.raises(ChatTemplateError, match="must start with user"):
        tiny.apply_chat_template([{"role": "assistant", "content": "x"}], chat_template=template)


@pytest.mark.parametrize("template", [
    "{{ messages[0].content + 1 }}",  # TypeError inside the template
    "{% for m in messages %}{{ m.role }",  # syntax error
    "{{ messages.append({'role': 'x'}) }}",  # the data is immutable
])
def test_broken_template_becomes_chat_template_error(tiny, template):
    with pytest.raises(ChatTemplateError):
        tiny.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template)


@pytest.mark.parametrize("messages", [
    "hello",
    [{"role": "user"}],
    [{"content": "no role"}],
    [{"role": "user", "content": 42}],
    ["not a dict"],
    None,
])
def test_malformed_messages(tiny, messages):
    with pytest.raises(ChatTemplateError, match="message"):
        tiny.apply_chat_template(messages)


def test_tool_call_message_without_content_is_accepted(tiny):
    call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [{"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "1", "content": "42"}]
    # A template with tool support sees no content (templates without get quill.structured.tool_messages' fallback).
    template = "{% if tools %}{% endif %}{% for m in messages %}{{ m.content is defined }}{% endfor %}"
    assert tiny.apply_chat_template(messages, chat_template=template) == "FalseTrue"


@pytest.mark.parametrize("messages, fault", [
    ([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "zzz", "content": "x"}],
     "result of tool call 'zzz', which the assistant message before it did not make"),
    ([{"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                                           {"id": "b", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "a", "content": "1"}, {"role": "user", "content": "and?"}],
     "the tool calls of message 0 have no results before message 2: 'b'"),
    ([{"role": "user", "content": "hi"},
      {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
     "the tool calls of message 1 have no results: 'a'"),
])
def test_tool_results_must_answer_the_calls_before_them(tiny, messages, fault):
    """OpenAI's rule: otherwise the model would see a conversation that never happened."""
    with pytest.raises(ChatTemplateError, match=fault):
        tiny.apply_chat_template(messages, chat_template="{% for m in messages %}{{ m.role }}{% endfor %}")


def test_extra_template_variables(tiny):
    template = "{{ greeting }} {% if enable_thinking %}think{% endif %}"
    assert tiny.apply_chat_template([], chat_template=template, greeting="hey", enable_thinking=True) == "hey think"


@pytest.mark.parametrize("attack", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__.__subclasses__()[0].__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ joiner.__init__.__globals__.__builtins__.open('{marker}', 'w').write('x') }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('touch {marker}') }}",
    "{% set x = namespace() %}{{ x.__init__.__globals__ }}",
    "{{ messages.__class__.__mro__ }}",
])
def test_sandbox_escapes_fail_harmlessly(tiny, attack, tmp_path):
    marker = tmp_path / "pwned"
    template = attack.replace("{marker}", str(marker))
    try:
        text = tiny.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template)
    except ChatTemplateError:
        text = ""
    assert not marker.exists()
    assert "class" not in text and "function" not in text and "module" not in text


def test_bos_and_eos_globals(tiny):
    assert tiny.apply_chat_template([], chat_template="{{ bos_token }}|{{ eos_token }}") == "<s>|</s>"
