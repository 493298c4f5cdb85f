"""Sampling filters: only allowed tokens are ever drawn, and the draw follows the distribution."""
from __future__ import annotations

import pytest
import torch

from quill.engine.sampler import filtered_probabilities
from quill.errors import InvalidRequestError
from quill.sampling_params import SamplingParams


def _probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    rows = logits.shape[0]
    return filtered_probabilities(
        logits, temperature=torch.full((rows,), temperature), top_k=torch.full((rows,), top_k),
        top_p=torch.full((rows,), top_p), min_p=torch.full((rows,), min_p),
    )


LOGITS = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]]))


def _draw(probs: torch.Tensor, n: int = 20000) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.multinomial(probs[0], n, replacement=True, generator=generator)


def test_top_k_samples_only_the_k_best():
    draws = _draw(_probs(LOGITS, top_k=2))
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.4 / 0.7) < 0.02


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.4 + 0.3 = 0.7 < 0.8, so the third token is needed; the rest are never drawn.
    draws = _draw(_probs(LOGITS, top_p=0.8))
    assert set(draws.tolist()) == {0, 1, 2}


def test_min_p_drops_unlikely_tokens():
    # threshold 0.3 * 0.4 = 0.12: tokens with p 0.1 and 0.05 are removed
    draws = _draw(_probs(LOGITS, min_p=0.3))
    assert set(draws.tolist()) == {0, 1, 2}
    expected = torch.tensor([0.4, 0.3, 0.15]) / 0.85
    observed = torch.bincount(draws, minlength=3)[:3].float() / len(draws)
    assert torch.allclose(observed, expected, atol=0.015)


def test_temperature_sharpens():
    cold = _probs(LOGITS, temperature=0.5)[0]
    assert cold[0] > 0.4 and torch.isclose(cold.sum(), torch.tensor(1.0))
    expected = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]) ** 2
    assert torch.allclose(cold, expected / expected.sum(), atol=1e-6)


def test_rows_use_their_own_parameters():
    logits = LOGITS.repeat(2, 1)
    probs = filtered_probabilities(logits, temperature=torch.tensor([1.0, 1.0]), top_k=torch.tensor([1, 0]),
                                   top_p=torch.tensor([1.0, 1.0]), min_p=torch.tensor([0.0, 0.0]))
    assert probs[0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert torch.allclose(probs[1], torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]), atol=1e-6)


@pytest.mark.parametrize("field, value", [
    ("max_tokens", -1), ("max_tokens", -5), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5),
    ("min_p", 2.0), ("top_k", -3), ("seed", "x"), ("stop", [""]), ("stop", ["s"] * 17), ("stop", ["s" * 257]),
    ("stop_token_ids", [-1]), ("stop", 5), ("stop_token_ids", 5), ("logit_bias", [1, 2]),  # wrong kinds: typed too
])
def test_invalid_sampling_params_raise(field, value):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**{field: value})


def _request(prompt, outputs, **params):
    from quill.engine.request import Request

    request = Request("r", prompt, SamplingParams(**params), torch.Generator())
    request.token_ids.extend(outputs)
    return request


def test_penalties_follow_the_reference_formulas():
    from quill.engine.sampler import apply_logit_processors

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]])
    # token 0 in the prompt, token 1 once and token 3 twice in the output
    request = _request([0], [1, 3, 3], repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25,
                       logit_bias={4: 10.0})
    out = apply_logit_processors(logits, [request], frozenset())[0]
    expected = torch.tensor([
        2.0 / 2,                  # seen in prompt: positive logit divided
        -1.0 * 2 - 0.5 - 0.25,    # seen once in output: negative logit multiplied, then penalties
        0.5,                      # never seen
        3.0 / 2 - 0.5 - 2 * 0.25,  # seen twice
        1.0 + 10.0,               # biased
    ])
    assert torch.allclose(out, expected)
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]]))  # input untouched


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    from quill.engine.sampler import apply_logit_processors

    logits = torch.zeros(1, 5)
    early = _request([0], [1], min_tokens=2, stop_token_ids=[3])
    masked = apply_logit_processors(logits, [early], frozenset({4}))[0]
    assert masked[3] == masked[4] == float("-inf") and masked[:3].eq(0).all()
    done = _request([0], [1, 2], min_tokens=2, stop_token_ids=[3])
    assert apply_logit_processors(logits, [done], frozenset({4})).eq(0).all()


@pytest.mark.parametrize("fields", [{"temperature": 1e-300}, {"top_p": 1e-300}, {"temperature": 1e-6, "top_k": 2**62}])
def test_degenerate_values_become_greedy_instead_of_overflowing(fields):
    params = SamplingParams(**fields)
    assert params.greedy


def test_huge_top_k_and_tiny_top_p_still_sample():
    from quill.engine.request import Request
    from quill.engine.sampler import sample

    logits = LOGITS.repeat(2, 1)
    requests = [Request("a", [0], SamplingParams(top_k=2**62), torch.Generator().manual_seed(0)),
                Request("b", [0], SamplingParams(top_p=2e-5), torch.Generator().manual_seed(0))]
    tokens, _ = sample(logits, requests)
    assert 0 <= tokens[0] < 5 and tokens[1] == 0
