"""Token pricing (`quill.cost`) and the engine's busy-time split it is based on."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from engine_helpers import run_requests, tiny_engine
from quill.cost import (REFERENCE_PRICES, SELF_HOSTED, CostModel, Price, PriceFileError, comparison_lines, dollars,
                        load_price_file, measured_price, usage_table)
from quill.sampling_params import SamplingParams


def stats(prefill_seconds=2.0, prompt_tokens=1000, decode_seconds=10.0, generated_tokens=500):
    """The fields of `EngineStats` that pricing reads."""
    return SimpleNamespace(prefill_seconds=prefill_seconds, num_prompt_tokens=prompt_tokens,
                           decode_seconds=decode_seconds, num_generated_tokens=generated_tokens)


def test_price_per_1k_tokens():
    gpt4o = REFERENCE_PRICES["gpt-4o"]
    assert (gpt4o.input_per_1k, gpt4o.output_per_1k) == (0.0025, 0.01)
    assert REFERENCE_PRICES["claude-3.5-sonnet"] == Price(0.003, 0.015)
    assert gpt4o.cost(1000, 500) == pytest.approx(0.0025 + 0.005)
    assert gpt4o.cost(2_000_000, 1_000_000) == pytest.approx(5.0 + 10.0)


def test_measured_price_from_busy_time():
    # $3.60/hour is $0.001/s: 2 s of prefill over 1000 prompt tokens, 10 s of decode over 500 tokens
    price = measured_price(3.6, prefill_seconds=2.0, prompt_tokens=1000, decode_seconds=10.0, generated_tokens=500)
    assert price.input_per_1k == pytest.approx(0.002)
    assert price.output_per_1k == pytest.approx(0.02)
    # billed at these prices, the tokens add up to the machine's price for the busy time exactly
    assert price.cost(1000, 500) == pytest.approx(0.001 * (2.0 + 10.0))
    assert measured_price(3.6, 0.0, 0, 1.0, 10) is None  # nothing measured yet
    assert measured_price(3.6, 1.0, 10, 0.0, 0) is None


def test_charge_prices_a_request_and_keeps_totals():
    costs = CostModel(hourly_cost=3.6)
    first = costs.charge("m", stats(), prompt_tokens=300, cached_tokens=100, completion_tokens=50)
    # self-hosted: the 200 computed prompt tokens at $0.002/1K, 50 output tokens at $0.02/1K
    assert first["self_hosted_usd"] == pytest.approx(0.0004 + 0.001)
    assert first["self_hosted_price"] == pytest.approx({"input_per_1k": 0.002, "output_per_1k": 0.02})
    # reference APIs bill all 300 prompt tokens
    assert first["reference_usd"]["gpt-4o"] == pytest.approx(300 * 0.0025 / 1000 + 50 * 0.01 / 1000)
    assert first["reference_usd"]["claude-3.5-sonnet"] == pytest.approx(300 * 0.003 / 1000 + 50 * 0.015 / 1000)
    costs.charge("m", stats(), prompt_tokens=10, cached_tokens=0, completion_tokens=20)
    unmeasured = costs.charge("m", stats(generated_tokens=0), prompt_tokens=5, cached_tokens=0, completion_tokens=0)
    assert unmeasured["self_hosted_usd"] is None and unmeasured["self_hosted_price"] is None

    [entry] = costs.report({"m": Price(0.5, 1.5)})["data"]
    assert (entry["requests"], entry["prompt_tokens"], entry["cached_prompt_tokens"], entry["completion_tokens"]) == (
        3, 315, 100, 70)
    assert entry["self_hosted_usd"] == pytest.approx(0.0014 + (10 * 0.002 + 20 * 0.02) / 1000)
    assert entry["self_hosted_price"] == {"input_per_1k": 0.5, "output_per_1k": 1.5}
    assert entry["reference"]["gpt-4o"]["usd"] == pytest.approx((315 * 0.0025 + 70 * 0.01) / 1000)
    assert entry["reference"]["gpt-4o"]["output_per_1k"] == 0.01


def test_cache_hits_are_free_and_counted_apart():
    costs = CostModel(hourly_cost=3.6)
    computed = costs.charge("m", stats(), prompt_tokens=300, cached_tokens=100, completion_tokens=50)
    hit = costs.charge_hit("m", stats(), prompt_tokens=300, completion_tokens=50, saved_usd=computed["self_hosted_usd"])
    assert computed["saved_usd"] == 0.0
    assert hit["self_hosted_usd"] == 0.0 and hit["saved_usd"] == computed["self_hosted_usd"]
    assert hit["self_hosted_price"] == computed["self_hosted_price"]
    assert hit["reference_usd"] == computed["reference_usd"]  # the hosted APIs would bill the same tokens
    [entry] = costs.report({})["data"]
    # the engine's work counts once; the hit shows apart with what it saved
    assert (entry["requests"], entry["prompt_tokens"], entry["completion_tokens"]) == (1, 300, 50)
    assert entry["self_hosted_usd"] == pytest.approx(computed["self_hosted_usd"])
    assert entry["reference"]["gpt-4o"]["usd"] == pytest.approx(computed["reference_usd"]["gpt-4o"])
    assert (entry["cache_hits"], entry["cache_saved_usd"]) == (1, pytest.approx(computed["self_hosted_usd"]))
    assert comparison_lines(costs.report({}))[-1].startswith("m: the response cache answered 1 more request, saving $")


def test_report_table_and_comparison():
    costs = CostModel(hourly_cost=0.1, reference_prices={"gpt-4o": REFERENCE_PRICES["gpt-4o"]})
    costs.charge("smollm2", stats(), prompt_tokens=1000, cached_tokens=0, completion_tokens=1000)
    report = costs.report({})
    header, rows = usage_table(report)
    assert header == ("model", "requests", "prompt tokens", "output tokens", SELF_HOSTED, "gpt-4o")
    assert rows[0][:4] == ("smollm2", "1", "1000", "1000") and rows[0][5] == "$0.0125"
    [line] = comparison_lines(report)
    assert "smollm2" in line and "would have cost $0.0125 on gpt-4o" in line and "$0.1/hour" in line


def test_dollars_keep_three_significant_digits():
    assert [dollars(x) for x in (0, 0.000123456, 0.5, 12.345, None)] == ["$0.00", "$0.000123", "$0.500", "$12.35", "n/a"]


def test_price_files(tmp_path):
    toml = tmp_path / "prices.toml"
    toml.write_text('[gpt-4o-mini]\ninput_per_1k = 0.00015\noutput_per_1k = 0.0006\n')
    assert load_price_file(toml) == {"gpt-4o-mini": Price(0.00015, 0.0006)}
    as_json = tmp_path / "prices.json"
    as_json.write_text(json.dumps({"a": {"input_per_1k": 1, "output_per_1k": 2}, "b": {"input_per_1k": 0,
                                                                                      "output_per_1k": 0.5}}))
    assert load_price_file(as_json) == {"a": Price(1.0, 2.0), "b": Price(0.0, 0.5)}
    for bad in ('{"a": {"input_per_1k": 1}}', '{"a": {"input_per_1k": -1, "output_per_1k": 1}}', "{}", "[1]", "{"):
        as_json.write_text(bad)
        with pytest.raises(PriceFileError):
            load_price_file(as_json)
    with pytest.raises(PriceFileError, match="cannot read"):
        load_price_file(tmp_path / "missing.toml")


def test_engine_splits_busy_time_between_prefill_and_decode(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir("llama"))
    before = engine.stats()
    assert (before.prefill_seconds, before.decode_seconds) == (0.0, 0.0)
    run_requests(engine, [[1, 2, 3, 4, 5], [6, 7, 8]], SamplingParams(max_tokens=6, ignore_eos=True, temperature=0))
    after = engine.stats()
    assert after.prefill_seconds > 0 and after.decode_seconds > 0
    assert (after.num_prompt_tokens, after.num_generated_tokens) == (8, 12)
    # a mixed step's time is split by rows: 3 prompt rows and 1 decode row get 3/4 and 1/4
    engine._account_step_time(1.0, num_prefill=3, num_tokens=4)
    assert engine.stats().prefill_seconds - after.prefill_seconds == pytest.approx(0.75)
    assert engine.stats().decode_seconds - after.decode_seconds == pytest.approx(0.25)
