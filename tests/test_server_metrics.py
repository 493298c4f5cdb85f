"""What the server reports about latency, tokens and cost agrees with what clients observe:
`usage.quill` timings, `/metrics` (parsed with the Prometheus parser), `GET /v1/usage` and
`quill cost`. One tiny text model (with a tiny tokenizer) served on a loopback port."""
from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine_helpers import tiny_text_engine
from quill import cli
from quill.server import BackgroundServer, ServerConfig, create_app

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    app = create_app(tiny_text_engine(tiny_model_dir("llama")), ServerConfig(served_model_name=MODEL))
    with BackgroundServer(app) as running:
        with httpx.Client(base_url=running.url, timeout=30) as client:
            yield running.url, client


def samples(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    text = client.get("/metrics").text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


HTTP_OK = ("quill:http_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))


def settled_samples(client: httpx.Client, expected_http_ok: float | None = None) -> dict[tuple[str, tuple], float]:
    """/metrics once the HTTP request counter has caught up: the gate counts a request after its
    response is sent, so a client can be a moment ahead of it. Without `expected_http_ok`, wait
    until the counter holds still."""
    deadline = time.monotonic() + 5
    current = samples(client)
    while time.monotonic() < deadline:
        if expected_http_ok is not None and current.get(HTTP_OK, 0.0) >= expected_http_ok:
            break
        time.sleep(0.1)
        previous, current = current, samples(client)
        if expected_http_ok is None and current.get(HTTP_OK) == previous.get(HTTP_OK):
            break
    return current


def delta(after: dict, before: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted({"model_name": MODEL, **labels}.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def completion(client: httpx.Client, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["usage"]


def test_reported_timeline_matches_what_the_client_saw(server):
    _, client = server
    # logprobs=0 makes every token an event of its own, so the client can count them
    body = {"model": MODEL, "prompt": [1, 5, 9, 13, 17], "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "logprobs": 0}
    tokens, first_token, usage = 0, None, None
    sent = time.perf_counter()
    with client.stream("POST", "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            for choice in event["choices"]:
                tokens += len(choice["logprobs"]["tokens"])
                first_token = first_token or time.perf_counter()
            usage = event.get("usage") or usage
    finished = time.perf_counter()
    client_ttft, client_e2e = first_token - sent, finished - sent
    quill = usage["quill"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (5, 12) and tokens == 12
    # The server's clock starts after the request arrived and stops before the bytes are out:
    # never more than the client saw, and not much less on loopback.
    tolerance = 0.5
    assert 0 <= quill["queue_time"] <= quill["time_to_first_token"] <= client_ttft
    assert client_ttft - quill["time_to_first_token"] < tolerance
    assert quill["time_to_first_token"] <= quill["e2e_latency"] <= client_e2e
    assert client_e2e - quill["e2e_latency"] < tolerance
    assert quill["generation_time"] == pytest.approx(quill["e2e_latency"] - quill["time_to_first_token"], abs=1e-3)
    assert 0 < quill["inter_token_latency_mean"] <= quill["inter_token_latency_max"] <= quill["generation_time"]
    assert quill["inter_token_latency_mean"] == pytest.approx(quill["generation_time"] / 11, rel=1e-3)


def test_metrics_counters_move_by_exactly_the_requests_served(server):
    _, client = server
    requests = [([1, 2, 3, 4, 5, 6, 7], 5), ([8, 9, 10], 9), ([11, 12, 13, 14], 1)]
    before = settled_samples(client)
    usages = [completion(client, prompt, max_tokens) for prompt, max_tokens in requests]
    count = len(requests)
    after = settled_samples(client, expected_http_ok=before.get(HTTP_OK, 0.0) + count)
    prompt_tokens = sum(len(prompt) for prompt, _ in requests)
    output_tokens = sum(max_tokens for _, max_tokens in requests)
    assert delta(after, before, "quill:prompt_tokens_total") == prompt_tokens
    assert delta(after, before, "quill:generation_tokens_total") == output_tokens
    assert delta(after, before, "quill:request_success_total", finished_reason="length") == count
    assert delta(after, before, "quill:request_prompt_tokens_sum") == prompt_tokens
    assert delta(after, before, "quill:request_generation_tokens_sum") == output_tokens
    for histogram in ("time_to_first_token_seconds", "request_queue_time_seconds", "e2e_request_latency_seconds"):
        assert delta(after, before, f"quill:{histogram}_count") == count, histogram
    # one inter-token latency per token after each request's first
    assert delta(after, before, "quill:inter_token_latency_seconds_count") == output_tokens - count
    ttft_sum = delta(after, before, "quill:time_to_first_token_seconds_sum")
    assert ttft_sum == pytest.approx(sum(u["quill"]["time_to_first_token"] for u in usages), abs=1e-4)
    assert after[HTTP_OK] - before.get(HTTP_OK, 0.0) == count
    assert delta(after, before, "quill:prefix_cache_queries_total") >= count
    for price in ("gpt-4o", "claude-3.5-sonnet"):
        assert delta(after, before, "quill:request_cost_dollars_total", price=price) == pytest.approx(
            sum(u["quill"]["cost"]["reference_usd"][price] for u in usages))
    assert delta(after, before, "quill:request_cost_dollars_total", price="self-hosted") == pytest.approx(
        sum(u["quill"]["cost"]["self_hosted_usd"] for u in usages))
    assert delta(after, before, "quill:engine_prefill_seconds_total") > 0
    assert delta(after, before, "quill:engine_decode_seconds_total") > 0
    price = ("quill:price_per_1k_tokens_dollars", (("model_name", MODEL), ("price", "gpt-4o"), ("token_type", "output")))
    assert after[price] == 0.01
    for gauge in ("quill:num_requests_running", "quill:num_requests_waiting", "quill:kv_cache_usage_perc"):
        assert (gauge, (("model_name", MODEL),)) in after, gauge


def test_each_response_carries_its_cost(server):
    _, client = server
    usage = completion(client, [1, 2, 3, 4, 5, 6], 8)
    cost = usage["quill"]["cost"]
    price = cost["self_hosted_price"]  # measured by then: the server has run requests
    computed_prompt = usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
    assert cost["self_hosted_usd"] == pytest.approx(
        (computed_prompt * price["input_per_1k"] + usage["completion_tokens"] * price["output_per_1k"]) / 1000)
    assert cost["reference_usd"]["gpt-4o"] == pytest.approx((6 * 0.0025 + 8 * 0.01) / 1000)
    assert cost["reference_usd"]["claude-3.5-sonnet"] == pytest.approx((6 * 0.003 + 8 * 0.015) / 1000)


def test_usage_endpoint_and_quill_cost_add_up_the_traffic(server, capsys):
    url, client = server
    before = client.get("/v1/usage").json()
    usages = [completion(client, [20, 21, 22], 4), completion(client, [23, 24, 25, 26], 6)]
    report = client.get("/v1/usage").json()
    assert report["object"] == "usage" and report["hourly_cost_usd"] == 0.10
    [was], [now] = before["data"], report["data"]
    assert now["model"] == MODEL and now["requests"] - was["requests"] == 2
    assert now["prompt_tokens"] - was["prompt_tokens"] == 7
    assert now["completion_tokens"] - was["completion_tokens"] == 10
    assert now["self_hosted_usd"] - was["self_hosted_usd"] == pytest.approx(
        sum(u["quill"]["cost"]["self_hosted_usd"] for u in usages))
    gpt4o = now["reference"]["gpt-4o"]["usd"] - was["reference"]["gpt-4o"]["usd"]
    assert gpt4o == pytest.approx((7 * 0.0025 + 10 * 0.01) / 1000)
    assert now["self_hosted_price"]["input_per_1k"] > 0

    assert cli.main(["cost", "--url", url]) == 0
    printed = capsys.readouterr().out
    assert "self-hosted" in printed and "gpt-4o" in printed and f"{now['completion_tokens']}" in printed
    assert "would have cost $" in printed and "on claude-3.5-sonnet" in printed
    assert cli.main(["cost", "--url", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data"][0]["requests"] >= now["requests"]
