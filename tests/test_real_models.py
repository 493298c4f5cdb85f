"""The two packaged real models: they answer correctly, greedy output matches transformers
running the same GGUF file in float32, and the native quantized path matches the expanded one."""
from __future__ import annotations

import pytest
import torch

from engine_helpers import all_position_logits
from quill import LLM, SamplingParams
from quill.layers.linear import prepare_linears_for_cpu
from quill.layers.matmul import kernel_available
from quill.layers.quantized import Int4Linear
from quill.models.loader import build_model, load_checkpoint
from quill.tokenizer import load_tokenizer
from quill.errors import ChatTemplateError, ContextLengthError, InvalidRequestError, ModelLoadError

pytestmark = pytest.mark.real_model

GREEDY = SamplingParams(max_tokens=24, temperature=0)
PARITY_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]
NEAR_TIE = 1e-3  # reference top-2 logit margin under which a differing token is a numerical tie


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return LLM(smollm2_gguf)


@pytest.fixture(scope="module")
def gemma3(gemma3_gguf):
    return LLM(gemma3_gguf)


# Not "What is the capital of France?": SmolLM2's first token there is a near-tie (0.0003 nats
# between "The" and "L'"), which any rounding decides; llama.cpp on the same file answers "L'Étoile".
def test_smollm2_chat_knows_the_capital_of_france(smollm2):
    out = smollm2.chat([{"role": "user", "content": "Name the capital of France."}], GREEDY)
    assert "Paris" in out.text
    assert out.finish_reason in ("stop", "length")
    assert out.metrics.ttft > 0 and out.num_prompt_tokens > 5


# The 270M Gemma base model continues the bare prompt with " the capital of the country of
# France." (llama.cpp on the same file says the same), so it gets one more word of context.
@pytest.mark.parametrize("model_fixture, prompt", [
    ("smollm2", "The capital of France is"),
    ("gemma3", "The capital of France is the city of"),
])
def test_completion_knows_the_capital_of_france(model_fixture, prompt, request):
    llm = request.getfixturevalue(model_fixture)
    out = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0))[0]
    assert "Paris" in out.text


def test_gemma3_chat_without_template_is_a_clear_error(gemma3):
    with pytest.raises(ChatTemplateError, match="chat template"):
        gemma3.chat([{"role": "user", "content": "Hi"}], GREEDY)


def test_gemma3_chat_with_user_template(gemma3):
    template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
        "{{ m.content }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    out = gemma3.chat([{"role": "user", "content": "Complete: one, two, three,"}],
                      SamplingParams(max_tokens=6, temperature=0), chat_template=template)
    assert out.num_completion_tokens > 0


def test_streaming_matches_generate(smollm2):
    params = SamplingParams(max_tokens=20, temperature=0)
    full = smollm2.generate("Write a haiku about the sea.", params)[0]
    chunks = list(smollm2.stream("Write a haiku about the sea.", params))
    assert "".join(c.delta for c in chunks) == full.text
    assert chunks[-1].finished and chunks[-1].token_ids == full.token_ids
    assert smollm2.engine.kv_cache.num_free_blocks == smollm2.engine.kv_cache.num_blocks


def _assert_batch_invariant(llm: LLM, prompts: list[list[int]], *, logprobs: bool = True) -> None:
    """Each prompt's greedy tokens, and (with `logprobs`) their log-probabilities to the last bit
    (so every row's logits), are the same alone and when the prompts arrive one step apart."""
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=1 if logprobs else None)

    def result(output) -> tuple[list[int], list[float]]:
        return output.token_ids, [record.logprob for record in output.logprobs or []]

    alone = [result(llm.generate(p, params)[0]) for p in prompts]
    engine = llm.engine
    ids = {}
    finished = {}

    def collect(outputs) -> None:
        for output in outputs:
            if output.finished:
                finished[ids[output.request_id]] = result(output)

    for step, prompt in enumerate(prompts):
        ids[engine.add_request(prompt, params)] = step
        collect(engine.step())
    while engine.has_unfinished():
        collect(engine.step())
    assert [finished[i] for i in range(len(prompts))] == alone


def test_greedy_output_does_not_depend_on_the_batch(smollm2):
    """The bug users report from other engines: temperature-0 answers that change with load.
    Runs in the default dtype (bfloat16), with mixed lengths and staggered arrivals."""
    _assert_batch_invariant(smollm2, [smollm2.tokenizer.encode(p)
                                      for p in PARITY_PROMPTS + ["Hi", "List five fruits:" * 3]])


def test_long_and_short_prompts_together_are_batch_invariant(smollm2_gguf):
    """Prompts of hundreds of tokens (prefilled in chunks of many rows) next to short ones and to
    rows that decode: the same tokens and logprobs alone and in company. (No prefix cache, so that
    the runs alone do not turn the batched run's prompts into cache hits.)"""
    llm = LLM(smollm2_gguf, enable_prefix_caching=False)
    long_prompts = [llm.tokenizer.encode(f"{i}. {PARITY_TEXT * 5}") for i in range(2)]
    short = [llm.tokenizer.encode(p) for p in PARITY_PROMPTS[:2]]
    _assert_batch_invariant(llm, [short[0], long_prompts[0], short[1], long_prompts[1]])


def test_many_greedy_rows_in_one_step_keep_their_tokens(smollm2):
    """More rows than the kernels take in one pass (16): every prompt's tokens and logprobs stay
    those it gets alone."""
    prompts = [smollm2.tokenizer.encode(f"{i} {p}") for i in range(4) for p in PARITY_PROMPTS + ["Hi"]]
    assert len(prompts) > 16
    _assert_batch_invariant(smollm2, prompts)


def test_bad_prompts_are_clear_errors(smollm2):
    with pytest.raises(InvalidRequestError, match="empty"):
        smollm2.generate("", GREEDY)
    with pytest.raises(ContextLengthError, match="context window"):
        smollm2.generate([1] * (smollm2.engine.max_model_len + 5), GREEDY)


def test_one_bad_prompt_in_a_batch_leaves_nothing_queued(smollm2):
    with pytest.raises(InvalidRequestError, match="empty"):
        smollm2.generate(["The sky is", ""], GREEDY)
    assert not smollm2.engine.has_unfinished()
    assert smollm2.engine.kv_cache.num_free_blocks == smollm2.engine.kv_cache.num_blocks


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError):
        LLM(tmp_path / "nope.gguf")


def _reference_greedy(model, prompt_ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens from transformers and, per step, the margin between its top two logits."""
    ids = torch.tensor([prompt_ids])
    tokens, margins = [], []
    with torch.no_grad():
        past = None
        for _ in range(steps):
            out = model(ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            top2 = out.logits[0, -1].topk(2)
            tokens.append(int(top2.indices[0]))
            margins.append(float(top2.values[0] - top2.values[1]))
            ids = top2.indices[:1].view(1, 1)
    return tokens, margins


@pytest.mark.parametrize("gguf_fixture", ["smollm2_gguf", "gemma3_gguf"])
def test_greedy_matches_transformers_on_same_gguf(gguf_fixture, request):
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(gguf_fixture)
    llm = LLM(path, dtype="float32", dequantize=True)  # the reference runs in float32 on expanded weights too
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    steps = 24
    for prompt in PARITY_PROMPTS:
        prompt_ids = llm.tokenizer.encode(prompt)
        ours = llm.generate(prompt_ids, SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True))[0].token_ids
        theirs, margins = _reference_greedy(reference, prompt_ids, steps)
        if ours != theirs:
            first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
            # After a divergence the sequences differ, so only the first difference can be judged.
            assert margins[first] < NEAR_TIE, (
                f"{prompt!r}: diverged at token {first} with reference margin {margins[first]:.4f}")
            print(f"near-tie tolerated for {prompt!r} at token {first} (margin {margins[first]:.2e})")


PARITY_TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
               "combined movable metal type, oil-based ink and a wooden press adapted from wine making. Within "
               "fifty years printing shops had spread to more than two hundred cities across Europe.")
QUANTIZATION_TIE = 0.1  # top-2 margin under which bf16 rounding may pick either token


@pytest.mark.parametrize("gguf_fixture", ["smollm2_gguf", "gemma3_gguf"])
def test_native_quantized_logits_match_the_dequantized_path(gguf_fixture, request):
    """Running Q4 weights natively (bf16 activations and scales, int8 LM head) must be no further
    from the float32 reference than expanding them to bf16 is, on the logits of likely tokens."""
    path = request.getfixturevalue(gguf_fixture)
    logits = {}
    for label, dtype, native in [("float32", torch.float32, False), ("bfloat16", torch.bfloat16, False),
                                 ("native", torch.bfloat16, True)]:
        checkpoint = load_checkpoint(path, dtype, keep_quantized=native)
        model = build_model(checkpoint.config, checkpoint.tensors, dtype)
        assert any(isinstance(m, Int4Linear) for m in model.modules()) == native
        logits[label] = all_position_logits(model, checkpoint.config, load_tokenizer(path).encode(PARITY_TEXT))
    reference = logits["float32"]
    likely = reference.topk(50, dim=-1).indices  # the tail's logits hardly move any probability

    def error(label: str) -> torch.Tensor:
        return (logits[label].gather(-1, likely) - reference.gather(-1, likely)).abs().mean()

    bf16_error, native_error = error("bfloat16"), error("native")
    assert native_error <= 1.5 * bf16_error, (native_error, bf16_error)
    assert (logits["native"].argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("gguf_fixture", ["smollm2_gguf", "gemma3_gguf"])
def test_int8_activations_stay_close_to_the_float_reference(gguf_fixture, request):
    """8-bit activations (the CPU's default) cost some of the logits' precision, and this bounds
    how much: on the likely tokens, at most twice the error of expanding the weights to bf16 (AMD
    EPYC measured 1.7x on SmolLM2, 1.2x on Gemma 3, over 512 held-out tokens), with the same argmax
    nearly everywhere. A wrong scale or a misread nibble would be off by far more."""
    if not kernel_available():
        pytest.skip("8-bit activations run in the C kernel")
    path = request.getfixturevalue(gguf_fixture)
    ids = load_tokenizer(path).encode(PARITY_TEXT)
    logits = {}
    for label, dtype, native in [("float32", torch.float32, False), ("bfloat16", torch.bfloat16, False),
                                 ("int8", torch.bfloat16, True)]:
        checkpoint = load_checkpoint(path, dtype, keep_quantized=native)
        model = build_model(checkpoint.config, checkpoint.tensors, dtype)
        if native:
            prepare_linears_for_cpu(model, int8_activations=True)
        assert any(getattr(m.matmul, "format", None) == "int4_q8" for m in model.modules()
                   if isinstance(m, Int4Linear)) == native
        logits[label] = all_position_logits(model, checkpoint.config, ids)
    reference = logits["float32"]
    likely = reference.topk(50, dim=-1).indices

    def error(label: str) -> torch.Tensor:
        return (logits[label].gather(-1, likely) - reference.gather(-1, likely)).abs().mean()

    assert error("int8") <= 2.0 * error("bfloat16"), (error("int8"), error("bfloat16"))
    assert (logits["int8"].argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("gguf_fixture", ["smollm2_gguf", "gemma3_gguf"])
def test_native_quantized_greedy_output_matches_the_dequantized_path(gguf_fixture, request):
    """The same weights natively and expanded to float32 give the same greedy tokens, except where
    bf16 rounding meets a near-tie. This is about the weights, so the activations stay bfloat16;
    the default 8-bit activations lose more than bf16 rounding (a tie of 0.22 flipped on SmolLM2)
    and are bounded on the logits instead (`test_int8_activations_stay_close_to_the_float_reference`)."""
    path = request.getfixturevalue(gguf_fixture)
    reference, native = LLM(path, dtype="float32", dequantize=True), LLM(path, int8_activations=False)
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True, logprobs=2)
    for prompt in PARITY_PROMPTS:
        expected, ours = (llm.generate(prompt, params)[0] for llm in (reference, native))
        if ours.token_ids != expected.token_ids:
            first = next(i for i, (a, b) in enumerate(zip(ours.token_ids, expected.token_ids)) if a != b)
            (_, best), (_, second) = expected.logprobs[first].top[:2]
            assert best - second < QUANTIZATION_TIE, f"{prompt!r}: diverged at token {first}, margin {best - second:.3f}"


def test_what_the_prefix_cache_held_does_not_change_the_answer(smollm2_gguf):
    """A greedy request's tokens and logprobs are the same with a cold cache, with part of its
    prompt cached by an earlier request, and with all of its prompt's blocks computed by a longer
    earlier prompt; and a follow-up turn whose history was generated by decoding gets the same
    answer whether that history comes from the cache or is prefilled afresh. (Found through the
    server: three identical temperature-0 requests once gave two different answers.)"""
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=2)

    def answer(llm: LLM, prompt: list[int]) -> tuple[tuple, int]:
        output = llm.generate(prompt, params)[0]
        logprobs = [(record.logprob, record.top) for record in output.logprobs]
        return (output.token_ids, logprobs), output.metrics.num_cached_prompt_tokens

    def chat(content: str) -> list[int]:
        return cold.tokenizer.encode_chat([{"role": "user", "content": content}])

    cold = LLM(smollm2_gguf, enable_prefix_caching=False)
    prompt = chat("Question 0: describe the color red in detail.")
    reference, _ = answer(cold, prompt)

    partly = LLM(smollm2_gguf)
    partly.generate(chat("Question 0: describe the color blue in detail."), SamplingParams(max_tokens=1))
    result, cached = answer(partly, prompt)
    assert 0 < cached < len(prompt) and result == reference

    longer = LLM(smollm2_gguf)
    longer.generate(prompt + cold.tokenizer.encode(" And green, and every other colour.", add_special_tokens=False),
                    SamplingParams(max_tokens=1))
    result, cached = answer(longer, prompt)
    assert cached >= len(prompt) - longer.engine.kv_cache.block_size and result == reference

    # A second turn: its history holds the tokens the engine decoded, whose blocks `partly` caches.
    follow_up = prompt + reference[0] + cold.tokenizer.encode("\nNow in one sentence.", add_special_tokens=False)
    fresh, _ = answer(cold, follow_up)
    result, cached = answer(partly, follow_up)
    assert cached > len(prompt) and result == fresh
