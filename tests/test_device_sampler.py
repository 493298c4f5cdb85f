"""The tensor-op sampler (what a GPU samples with) draws exactly what the plain sampler draws.

On the CPU, with the same generators, `sample_on_device` must return the tokens and logprobs of
`quill.engine.sampler.sample` bit for bit, on random batches mixing greedy and sampled rows, seeds,
top-k/top-p/min-p, logit bias, min_tokens, penalties, logprobs and grammar masks. On CUDA (skipped without one) it
must agree with the CPU for greedy rows and be reproducible per seed.
"""
from __future__ import annotations

import random

import pytest
import torch

from quill.engine.device_sampler import process_logits, sample_on_device
from quill.engine.request import Request
from quill.engine.sampler import apply_logit_processors, sample
from quill.sampling_params import SamplingParams
from quill.structured.masks import TokenMasks

VOCAB = 300
EOS = frozenset({2, 7})


def _random_params(rng: random.Random) -> SamplingParams:
    options = dict(
        temperature=rng.choice([0.0, 0.0, 0.3, 0.7, 1.0, 1.5]),
        top_k=rng.choice([0, 0, 1, 5, 50, 10_000]),
        top_p=rng.choice([1.0, 1.0, 0.9, 0.5, 0.05]),
        min_p=rng.choice([0.0, 0.0, 0.05, 0.3]),
        seed=rng.choice([None, rng.randrange(-2**40, 2**40)]),
        logprobs=rng.choice([None, None, 0, 3, 20]),
        repetition_penalty=rng.choice([1.0, 1.0, 0.8, 1.3, 2.0]),
        presence_penalty=rng.choice([0.0, 0.0, 0.5, -1.2]),
        frequency_penalty=rng.choice([0.0, 0.0, 0.3, -0.7]),
        logit_bias={rng.randrange(VOCAB + 20): rng.uniform(-100, 100) for _ in range(rng.choice([0, 0, 1, 4]))},
        stop_token_ids=rng.sample(range(VOCAB), rng.choice([0, 2])),
        ignore_eos=rng.random() < 0.3,
        max_tokens=50,
    )
    options["min_tokens"] = rng.choice([0, 0, 3, 50])
    return SamplingParams(**options)


def _request_pair(rng: random.Random, index: int) -> tuple[Request, Request]:
    """Two identical requests (same tokens, same generator state), one for each sampler."""
    params = _random_params(rng)
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 30))]
    outputs = [rng.randrange(VOCAB) for _ in range(rng.choice([0, 1, 5, 40]))]
    seed = params.seed if params.seed is not None else rng.randrange(2**62)
    pair = []
    for _ in range(2):
        request = Request(f"r{index}", prompt, params, torch.Generator().manual_seed(seed))
        request.token_ids.extend(outputs)
        pair.append(request)
    return pair[0], pair[1]


def _random_logits(rng: random.Random, rows: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    logits = torch.randn(rows, VOCAB, generator=generator) * rng.choice([0.5, 3.0, 10.0])
    if rng.random() < 0.3:  # ties: the samplers must break them alike
        logits[:, :20] = logits[:, :1]
    return logits


def _random_masks(rng: random.Random, rows: int) -> TokenMasks | None:
    """Grammar masks on some rows (None: no constrained row), each allowing about half the
    vocabulary, so that no row is left without a token after min_tokens bans its ends."""
    if rng.random() < 0.5:
        return None
    constrained = sorted(rng.sample(range(rows), rng.randrange(1, rows + 1)))
    words = (VOCAB + 31) // 32
    bits = torch.tensor([[rng.getrandbits(32) - 2**31 for _ in range(words)] for _ in constrained], dtype=torch.int32)
    return TokenMasks(constrained, bits)


@pytest.mark.parametrize("case", range(60))
def test_draws_exactly_what_the_plain_sampler_draws(case):
    rng = random.Random(case)
    pairs = [_request_pair(rng, i) for i in range(rng.randrange(1, 9))]
    plain, device = [p[0] for p in pairs], [p[1] for p in pairs]
    for step in range(3):  # consecutive draws: the generators must advance alike
        logits = _random_logits(rng, len(pairs))
        masks = _random_masks(rng, len(pairs))
        expected = sample(logits, plain, EOS, masks)
        got = sample_on_device(logits, device, EOS, masks)
        assert got[0] == expected[0], f"step {step}"
        assert got[1] == expected[1], f"step {step}"
        for a, b, token in zip(plain, device, expected[0]):
            a.token_ids.append(token)
            b.token_ids.append(token)


@pytest.mark.parametrize("case", range(30))
def test_processed_logits_are_bit_identical(case):
    rng = random.Random(1000 + case)
    requests = [_request_pair(rng, i)[0] for i in range(rng.randrange(1, 9))]
    logits = _random_logits(rng, len(requests))
    expected = apply_logit_processors(logits, requests, EOS)
    got = process_logits(logits, requests, EOS)
    assert torch.equal(got, expected)


def test_a_grammar_mask_keeps_its_row_off_disallowed_tokens():
    # The identity above would hold trivially if neither sampler applied the masks.
    logits = torch.zeros(2, VOCAB)
    logits[:, 5] = 10.0
    requests = [Request(name, [1], SamplingParams(temperature=0), torch.Generator()) for name in "ab"]
    bits = torch.zeros(1, (VOCAB + 31) // 32, dtype=torch.int32)
    bits[0, 0] = 1 << 9  # only token 9 allowed
    tokens, _ = sample_on_device(logits, requests, masks=TokenMasks([1], bits))
    assert tokens == [5, 9]


def test_logit_bias_and_penalties_change_the_tokens():
    # The identity above would hold trivially if neither sampler processed anything.
    logits = torch.zeros(2, VOCAB)
    logits[:, 5] = 1.0
    biased = Request("a", [1], SamplingParams(temperature=0, logit_bias={9: 5.0}), torch.Generator())
    penalised = Request("b", [5], SamplingParams(temperature=0, repetition_penalty=2.0,
                                                 presence_penalty=2.0), torch.Generator())
    penalised.token_ids.append(5)
    tokens, _ = sample_on_device(logits, [biased, penalised])
    assert tokens[0] == 9 and tokens[1] != 5


def test_a_seeded_row_draws_the_same_whatever_the_batch():
    rng = random.Random(7)
    logits = _random_logits(rng, 4)
    params = SamplingParams(temperature=1.0, seed=123)
    alone = sample_on_device(logits[:1], [Request("a", [1], params, torch.Generator().manual_seed(123))])[0]
    others = [Request(f"o{i}", [1], SamplingParams(temperature=1.0), torch.Generator().manual_seed(i))
              for i in range(3)]
    batched = sample_on_device(logits, [Request("a", [1], params, torch.Generator().manual_seed(123)), *others])[0]
    assert batched[0] == alone[0]


def test_a_gpu_request_without_a_device_generator_is_refused():
    request = Request("a", [1], SamplingParams(temperature=1.0), torch.Generator())
    from quill.engine.device_sampler import generator_for
    with pytest.raises(ValueError, match="no generator"):
        generator_for(request, torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_greedy_matches_the_cpu_and_seeds_reproduce():
    rng = random.Random(3)
    logits = _random_logits(rng, 6)
    device = torch.device("cuda")

    def requests(temperature):
        made = []
        for i in range(6):
            request = Request(f"r{i}", [1, 2], SamplingParams(temperature=temperature, seed=i, logprobs=2),
                              torch.Generator().manual_seed(i))
            request.device_generator = torch.Generator(device).manual_seed(i)
            made.append(request)
        return made

    cpu_tokens, cpu_logprobs = sample(logits, requests(0.0))
    gpu_tokens, gpu_logprobs = sample_on_device(logits.to(device), requests(0.0))
    assert gpu_tokens == cpu_tokens
    for a, b in zip(cpu_logprobs, gpu_logprobs):
        assert abs(a.logprob - b.logprob) < 1e-4
    first = sample_on_device(logits.to(device), requests(1.0))[0]
    assert sample_on_device(logits.to(device), requests(1.0))[0] == first
