"""Speculative decoding must not change what the model says: greedy output is identical with it on
or off, sampled output has exactly the target's distribution, and rollbacks never leak blocks."""
from __future__ import annotations

import json
import random

import pytest
import torch

from engine_helpers import all_position_logits, load_model, run_requests, tiny_engine
from quill.engine.request import Request
from quill.errors import ModelLoadError
from quill.engine.sampler import sampling_probabilities
from quill.sampling_params import SamplingParams
from quill.speculative.drafter import Draft
from quill.speculative.ngram import NgramDrafter
from quill.speculative.verifier import accept_or_resample, verify

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def _prompts(seed: int = 0) -> list[list[int]]:
    """Random prompts, prompts that repeat themselves (n-gram drafts hit), and a shared prefix."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 320) for _ in range(rng.randint(3, 50))] for _ in range(5)]
    pattern = [rng.randrange(3, 320) for _ in range(7)]
    return prompts + [pattern * 5, pattern * 3 + [11, 12], prompts[0][:40] + pattern * 2]


def _mixed_params(reference: list[list[int]]) -> list[SamplingParams]:
    """Speculating and non-speculating requests, stop ids, min_tokens and max_tokens limits."""
    return [
        GREEDY,
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, speculative=False),
        SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[reference[2][9]]),
        SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0, min_tokens=12, stop_token_ids=[reference[4][3]]),
        GREEDY,
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2),
        GREEDY,
    ]


def _assert_no_leaks(engine) -> None:
    assert not engine.has_unfinished()
    for kv_cache in (engine.kv_cache, getattr(engine.speculator.drafter, "kv_cache", None)):
        if kv_cache is not None:
            assert kv_cache.num_free_blocks == kv_cache.num_blocks
            assert all(count == 0 for count in kv_cache.ref_counts)


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def other_llama(llama, tmp_path_factory):
    """The target with noise on its weights: a draft model that is often but not always right."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(llama)
    torch.manual_seed(1)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(torch.randn_like(weight) * weight.std() * 0.3)
    path = tmp_path_factory.mktemp("draft-llama")
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def plain(llama):
    prompts = _prompts()
    return run_requests(tiny_engine(llama), prompts, GREEDY)


@pytest.mark.parametrize("drafter", ["ngram", "other", "same"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_output_is_identical_with_speculation(llama, other_llama, plain, drafter, k):
    speculative = {"ngram": "ngram", "other": str(other_llama), "same": str(llama)}[drafter]
    prompts = _prompts()
    params = _mixed_params(plain)
    # A busy batch: requests arrive while others run, prompts are chunked, prefixes are shared.
    options = dict(max_num_batched_tokens=20, enable_prefix_caching=True)
    expected = run_requests(tiny_engine(llama, **options), prompts, params, arrive_every=2)
    engine = tiny_engine(llama, speculative=speculative, num_speculative_tokens=k, **options)
    assert run_requests(engine, prompts, params, arrive_every=2) == expected
    stats = engine.stats()
    assert stats.spec_num_accepted_tokens > 0  # the test exercised multi-token commits
    if drafter == "same":
        assert stats.spec_acceptance_rate == 1.0  # a draft identical to the target is always right
    _assert_no_leaks(engine)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verification_logits_are_bit_identical_to_decoding(tiny_model_dir, arch, dtype):
    """The invariant greedy speculation rests on: logits of [last token, drafts...] in one forward
    equal, bit for bit, those of decoding the same tokens one at a time."""
    from quill.engine.runner import ModelRunner, kv_cache_dtype

    model, config = load_model(tiny_model_dir(arch), dtype)
    cpu = torch.device("cpu")
    runner = ModelRunner(model, config, num_blocks=8, block_size=16, kv_cache_dtype=kv_cache_dtype("auto", dtype, cpu),
                         device=cpu)
    context, drafts = _prompts()[0][:30], [5, 9, 5, 200, 17]
    decoding = Request("decode", context[:-1], SamplingParams(), torch.Generator())
    verifying = Request("verify", context[:-1], SamplingParams(), torch.Generator())
    decoding.block_ids, verifying.block_ids = [0, 1, 2], [3, 4, 5]
    for request in (decoding, verifying):  # the same prefill for both
        runner.execute([request], [len(context) - 1])
        request.num_computed_tokens = len(context) - 1
        request.token_ids.append(context[-1])
    one_by_one = []
    for token in [None] + drafts:
        if token is not None:
            decoding.token_ids.append(token)
        one_by_one.append(runner.execute([decoding], [1]).logits[0])
        decoding.num_computed_tokens += 1
    verifying.draft_token_ids = drafts
    together = runner.execute([verifying], [1 + len(drafts)]).logits
    assert torch.equal(together, torch.stack(one_by_one))


@pytest.mark.parametrize("arch", ["qwen2", "gemma3", "qwen3", "smollm3", "phi3", "qwen3moe"])  # gemma3, phi3: sliding windows
def test_greedy_identical_on_other_architectures(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    prompts = _prompts(seed=1)
    expected = run_requests(tiny_engine(path), prompts, GREEDY)
    engine = tiny_engine(path, speculative="ngram", max_num_batched_tokens=32)
    assert run_requests(engine, prompts, GREEDY, arrive_every=1) == expected
    _assert_no_leaks(engine)


def test_bfloat16_greedy_identical(llama):
    prompts = _prompts(seed=2)
    expected = run_requests(tiny_engine(llama, dtype="bfloat16"), prompts, GREEDY)
    engine = tiny_engine(llama, dtype="bfloat16", speculative="ngram")
    assert run_requests(engine, prompts, GREEDY) == expected


@pytest.mark.parametrize("drafter", ["ngram", "draft"])
def test_int8_activations_greedy_identical_with_speculation(llama, tmp_path, drafter):
    """4-bit weights with 8-bit activations, loaded as `LLM` loads them: verification rows are
    decoding rows there too, and a draft model follows the engine's activations."""
    from quill.config import EngineConfig
    from quill.engine.engine import Engine
    from quill.layers.quantized import Int4Linear
    from quill.models.loader import load_model as load_native
    from quill.optimize.quantize import quantize_checkpoint

    from quill.layers.matmul import kernel_available

    if not kernel_available():
        pytest.skip("8-bit activations run in the C kernel")
    path = tmp_path / "int4.gguf"
    quantize_checkpoint(llama, path, "int4", group_size=32, with_tokenizer=False, progress=False)

    def engine(**options) -> Engine:
        return Engine(*load_native(path, torch.bfloat16), None,
                      EngineConfig(dtype="bfloat16", int8_activations=True, **options))

    prompts = _prompts(seed=3)
    expected = run_requests(engine(), prompts, GREEDY)
    speculating = engine(speculative="ngram" if drafter == "ngram" else str(path))
    if drafter == "draft":
        draft_model = speculating.speculator.drafter.runner.model
        assert {m.matmul.format for m in draft_model.modules() if isinstance(m, Int4Linear)} == {"int4_q8"}
    assert run_requests(speculating, prompts, GREEDY) == expected
    _assert_no_leaks(speculating)


def test_logprobs_with_speculation_are_the_plain_ones(llama):
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=3)
    prompt = _prompts()[5]
    records = []
    for speculative in (None, "ngram"):
        engine = tiny_engine(llama, speculative=speculative)
        engine.add_request(prompt, params)
        while engine.has_unfinished():
            outputs = engine.step()
        records.append(outputs[-1].logprobs)
    assert len(records[1]) == 16
    for plain_record, spec_record in zip(*records):
        assert (plain_record.token_id, plain_record.top) == (spec_record.token_id, spec_record.top)
        assert plain_record.logprob == spec_record.logprob


# ------------------------------------------------------------------------ sampled: the math
def _total_variation(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


@pytest.mark.parametrize("draft", ["good", "bad", "one-hot"])
def test_rejection_step_reproduces_the_target_distribution(draft):
    p = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1, 0.0])
    q = {"good": torch.tensor([0.1, 0.35, 0.2, 0.2, 0.1, 0.05]),
         "bad": torch.tensor([0.6, 0.0, 0.05, 0.05, 0.1, 0.2]),  # mass where p has little or none
         "one-hot": None}[draft]
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(len(p))
    for _ in range(20_000):
        draft_token = 1 if q is None else int(torch.multinomial(q, 1, generator=generator))
        replacement = accept_or_resample(p, q, draft_token, generator)
        counts[draft_token if replacement is None else replacement] += 1
    assert counts[5] == 0  # a token the target forbids never comes out
    assert _total_variation(counts, p) < 0.015


def _chi_square_ok(counts: torch.Tensor, p: torch.Tensor) -> bool:
    """Pearson's test over the likely tokens (expected count >= 5), lumping the rest: a loose
    bound (about 4 standard deviations) so that a correct sampler practically never fails."""
    expected = p * counts.sum()
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expected > 0
    statistic = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    return statistic < dof + 4 * (2 * dof) ** 0.5


@pytest.mark.parametrize("draft", ["model", "bad"])
def test_verified_tokens_follow_the_target_on_a_random_model(llama, other_llama, draft):
    """A fixed context of a random model, drafts from a different model (or a deliberately bad
    distribution): the committed token follows the target's processed distribution."""
    model, config = load_model(llama)
    params = SamplingParams(temperature=0.8, top_k=50, max_tokens=8)
    context = _prompts()[5][:20]
    target_logits = all_position_logits(model, config, context)[-1]
    p = sampling_probabilities(target_logits[None], [params])[0]
    draft_model, _ = load_model(other_llama)
    q = torch.softmax(all_position_logits(draft_model, config, context)[-1], -1) if draft == "model" \
        else torch.softmax(-target_logits * 3, -1)
    next_logits: dict[int, torch.Tensor] = {}  # the target's logits after an accepted draft
    generator = torch.Generator().manual_seed(1)
    counts = torch.zeros(config.vocab_size)
    for _ in range(6000):
        draft_token = int(torch.multinomial(q, 1, generator=generator))
        if draft_token not in next_logits:
            next_logits[draft_token] = all_position_logits(model, config, context + [draft_token])[-1]
        request = Request("r", context, params, generator)
        request.draft_token_ids = [draft_token]
        (verdict,) = verify(torch.stack([target_logits, next_logits[draft_token]]), [request], [q[None]])
        counts[verdict.token_ids[0]] += 1
    assert _total_variation(counts, p) < 0.05
    assert _chi_square_ok(counts, p)


@pytest.mark.parametrize("drafter", ["ngram", "draft"])
def test_seeded_sampling_is_reproducible_with_speculation(llama, other_llama, drafter):
    speculative = "ngram" if drafter == "ngram" else str(other_llama)
    # A few favoured tokens make repeats (and so n-gram drafts) common while sampling.
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True,
                            logit_bias={t: 8.0 for t in range(3, 7)})
    prompts = _prompts()
    engine = tiny_engine(llama, speculative=speculative)
    alone = run_requests(engine, [prompts[5]], seeded)[0]
    assert run_requests(tiny_engine(llama, speculative=speculative), [prompts[5]], seeded)[0] == alone
    noise = SamplingParams(max_tokens=16, temperature=0.8, ignore_eos=True)
    busy_engine = tiny_engine(llama, speculative=speculative)
    busy = run_requests(busy_engine, prompts, [noise] * 5 + [seeded] + [noise] * 2, arrive_every=1)[5]
    assert busy == alone
    assert engine.stats().spec_num_draft_tokens > 0
    _assert_no_leaks(busy_engine)


def test_n_completions_with_speculation(llama):
    """Completion i of an n > 1 request is the lone request seeded with seed + i, drafts or not."""
    favoured = {t: 8.0 for t in range(3, 7)}  # repeats, so that n-gram drafts happen
    params = SamplingParams(max_tokens=12, temperature=0.7, seed=5, n=3, ignore_eos=True, logit_bias=favoured)
    engine = tiny_engine(llama, speculative="ngram")
    request_id = engine.add_request(_prompts()[6], params)
    finished = {}
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                finished[output.index] = output.token_ids
    for index, tokens in finished.items():
        alone = SamplingParams(max_tokens=12, temperature=0.7, seed=5 + index, ignore_eos=True, logit_bias=favoured)
        assert run_requests(tiny_engine(llama, speculative="ngram"), [_prompts()[6]], alone)[0] == tokens
    assert request_id and sorted(finished) == [0, 1, 2]
    assert engine.stats().spec_num_draft_tokens > 0
    _assert_no_leaks(engine)


def test_identical_draft_model_accepts_everything_when_sampling(llama):
    engine = tiny_engine(llama, speculative=str(llama), num_speculative_tokens=4)
    sampled = SamplingParams(max_tokens=30, temperature=1.0, seed=3, ignore_eos=True)
    run_requests(engine, _prompts()[:3], sampled)
    stats = engine.stats()
    # p and q come from the same weights; they differ only by rounding between batch shapes.
    assert stats.spec_acceptance_rate > 0.97
    assert stats.spec_mean_accepted_length > 4.0


# -------------------------------------------------------------------------- KV bookkeeping
@pytest.mark.parametrize("speculative", ["ngram", "draft"])
def test_aborts_with_drafts_in_flight_free_every_block(llama, other_llama, speculative):
    engine = tiny_engine(llama, speculative="ngram" if speculative == "ngram" else str(other_llama),
                         max_num_batched_tokens=24)
    for prompt in _prompts():
        engine.add_request(prompt, GREEDY)
    aborted = 0
    while engine.has_unfinished():
        engine.step()
        # Abort a request whose drafts are proposed (draft-model KV written) but not yet verified.
        drafting = [r.group_id for r in engine.requests.values() if r.draft_token_ids]
        if drafting and aborted < 4:
            engine.abort(drafting[0])
            aborted += 1
    assert aborted == 4
    _assert_no_leaks(engine)


@pytest.mark.parametrize("speculative", ["ngram", "draft"])
def test_preemption_with_speculation(llama, other_llama, plain, speculative):
    from quill.engine.runner import kv_bytes_per_token

    per_token = kv_bytes_per_token(tiny_engine(llama).model_config, torch.float32)
    engine = tiny_engine(llama, speculative="ngram" if speculative == "ngram" else str(other_llama),
                         kv_cache_memory=per_token * 16 * 8)  # 8 blocks of 16 tokens
    assert run_requests(engine, _prompts(), GREEDY) == plain
    assert engine.stats().num_preemptions > 0
    _assert_no_leaks(engine)


def test_rejected_drafts_give_their_blocks_back(llama):
    engine = tiny_engine(llama, speculative="ngram", num_speculative_tokens=8, block_size=4)
    engine.add_request(_prompts()[0][:13], GREEDY)
    engine.step()  # prefill; the first token is sampled and drafts proposed
    request = next(iter(engine.requests.values()))
    request.draft_token_ids = [319] * 8  # wrong for sure: spans two more blocks
    engine.step()
    assert request.num_computed_tokens == request.num_tokens - 1
    assert len(request.block_ids) == engine.kv_cache.blocks_needed(request.num_tokens)
    assert engine.stats().spec_num_accepted_tokens == 0
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks - len(request.block_ids)


# ------------------------------------------------------------------------- stops and drafters
def test_stop_string_inside_an_accepted_run(llama):
    from quill.config import EngineConfig
    from quill.engine.engine import Engine
    from quill.tokenizer import Tokenizer
    from tokenizer_helpers import tiny_sentencepiece_metadata

    tokenizer = Tokenizer.from_gguf_metadata(tiny_sentencepiece_metadata())
    pieces = range(259, tokenizer.vocab_size)  # text pieces only: readable output
    prompt = [259 + i % 19 for i in range(3, 60, 2)] * 2

    def run(speculative, stop):
        model, config = load_model(llama)
        engine = Engine(model, config, tokenizer, EngineConfig(dtype="float32", speculative=speculative))
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=stop,
                                logit_bias={t: 50.0 for t in pieces})
        engine.add_request(prompt, params)
        outputs = []
        while engine.has_unfinished():
            outputs += engine.step()
        return outputs

    text = run(None, [])[-1].text
    stop = text[len(text) // 2:len(text) // 2 + 6]
    expected = run(None, [stop])[-1]
    outputs = run("ngram", [stop])
    final = outputs[-1]
    assert (final.text, final.finish_reason) == (expected.text, "stop") and stop not in final.text
    assert final.token_ids == expected.token_ids
    assert max(len(o.new_token_ids) for o in outputs) > 1


class _FixedDrafter:
    """Proposes as many tokens as it is allowed, and records what it was asked for."""

    def __init__(self) -> None:
        self.asked: dict[str, int] = {}

    def propose(self, requests, max_lengths):
        self.asked = {r.request_id: n for r, n in zip(requests, max_lengths)}
        return [Draft([7] * n) for n in max_lengths]

    def finish(self, request_id):
        pass


def _decoding(request_id: str, params: SamplingParams) -> Request:
    request = Request(request_id, [1, 2, 3], params, torch.Generator())
    request.num_computed_tokens = 2
    return request


def test_drafts_fill_the_row_blocks_the_step_pays_for():
    """With row blocks of 4 and 3 decoding requests, only 1 draft row is free: greedy requests
    share it (most often accepted first) unless they are confident; sampled ones are never trimmed,
    so that their tokens do not depend on the batch."""
    from quill.speculative.speculator import CONFIDENT, Speculator

    drafter = _FixedDrafter()
    speculator = Speculator(drafter, num_speculative_tokens=4, max_model_len=100, row_block=4)
    greedy = SamplingParams(max_tokens=50, temperature=0)
    low, high = _decoding("low", greedy), _decoding("high", greedy)
    speculator._length(low).acceptance, speculator._length(high).acceptance = 0.2, 0.5
    speculator.propose([low, high, _decoding("other", SamplingParams(max_tokens=50, temperature=0, speculative=False))])
    assert drafter.asked == {"high": 1}

    speculator._length(high).acceptance = CONFIDENT
    sampled = _decoding("sampled", SamplingParams(max_tokens=50, temperature=1.0, seed=3))
    speculator.propose([low, high, sampled])
    # 3 decode rows + 4 + 4 confident/sampled drafts = 11: one row left in the third block
    assert drafter.asked == {"low": 1, "high": 4, "sampled": 4}

    speculator.row_block = None  # kernels that pay row by row: nothing is trimmed
    speculator.propose([low, high, sampled])
    assert drafter.asked == {"low": 4, "high": 4, "sampled": 4}


def test_ngram_drafter_proposes_the_latest_continuation():
    drafter = NgramDrafter(max_ngram=3, min_ngram=2)
    request = Request("r", [1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 2, 3], SamplingParams(), torch.Generator())
    (draft,) = drafter.propose([request], [3])
    assert draft.token_ids == [4, 6, 7]  # "2 3" last occurred before "4 6 7"
    request.token_ids += [4]  # now "2 3 4" (a 3-gram) matches, also last before "6 7"
    assert drafter.propose([request], [5])[0].token_ids == [6, 7, 2, 3, 4]
    request.token_ids += [8, 8, 1]
    assert drafter.propose([request], [5])[0].token_ids == []  # "8 1" never occurred before


def test_draft_model_with_another_vocabulary_is_refused(llama, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(ModelLoadError, match="vocabulary"):
        tiny_engine(llama, speculative=str(tmp_path))


# ----------------------------------------------------------------------- configuration, metrics
def test_metrics_and_cli_options(llama):
    from quill import cli
    from quill.cost import CostModel
    from quill.server.metrics import ServerMetrics

    engine = tiny_engine(llama, speculative="ngram")
    run_requests(engine, [_prompts()[5]], GREEDY)
    stats = engine.stats()
    assert stats.spec_num_draft_tokens >= stats.spec_num_accepted_tokens > 0
    assert stats.spec_acceptance_rate == stats.spec_num_accepted_tokens / stats.spec_num_draft_tokens
    assert stats.spec_mean_accepted_length == 1 + stats.spec_num_accepted_tokens / stats.spec_num_drafts
    text = ServerMetrics(engine, "tiny", CostModel()).render()[0].decode()
    accepted = stats.spec_num_accepted_tokens
    assert f'quill:spec_decode_num_accepted_tokens_total{{model_name="tiny"}} {accepted}.0' in text
    assert "quill:spec_decode_num_draft_tokens_total" in text and "quill:spec_decode_draft_acceptance_rate" in text
    for command in ("serve", "run", "chat"):
        argv = [command, "m", "--speculative", "ngram", "--num-speculative-tokens", "3"]
        args = cli.build_parser().parse_args(argv + (["hi"] if command == "run" else []))
        assert (args.speculative, args.num_speculative_tokens) == ("ngram", 3)


def test_server_streams_speculative_runs_and_honours_the_opt_out(llama):
    import httpx

    from quill.server import BackgroundServer, ServerConfig, create_app

    app = create_app(tiny_engine(llama, speculative="ngram"), ServerConfig(served_model_name="tiny"))
    body = {"model": "tiny", "prompt": _prompts()[5], "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        opted_out = client.post("/v1/completions", json={**body, "speculative": False}).json()
        assert client.get("/metrics").text.count("spec_decode_num_draft_tokens_total{model_name=\"tiny\"} 0.0") == 1
        plain = client.post("/v1/completions", json=body).json()
        with client.stream("POST", "/v1/completions", json={**body, "stream": True, "logprobs": 1}) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        metrics = client.get("/metrics").text
    assert opted_out["choices"][0]["text"] == plain["choices"][0]["text"]
    streamed = [c for chunk in chunks for c in chunk["choices"]]
    assert "".join(c["text"] for c in streamed) == plain["choices"][0]["text"]
    assert sum(len(c["logprobs"]["tokens"]) for c in streamed if c["logprobs"]) == 20
    assert "quill:spec_decode_num_accepted_tokens_total" in metrics
    assert 'spec_decode_num_draft_tokens_total{model_name="tiny"} 0.0' not in metrics
