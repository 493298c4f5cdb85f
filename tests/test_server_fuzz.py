"""Fuzz the server with schemathesis against its own OpenAPI schema: valid and invalid requests
for every operation, a bounded number of each. Whatever arrives, the answer is never a 5xx, and
the server (and its engine) keeps working afterwards."""
from __future__ import annotations

import time

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from quill.server import BackgroundServer, ServerConfig, create_app  # noqa: E402

EXAMPLES_PER_OPERATION = 25

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    from quill import LLM

    llm = LLM(smollm2_gguf)
    # Generation is kept short by the server's cap, so every example stays fast.
    app = create_app(llm, ServerConfig(served_model_name="smollm2", max_tokens_cap=3, max_body_bytes=1 << 20))
    with BackgroundServer(app) as running:
        yield app, running.url


def test_fuzz_openapi_schema_no_server_errors(server):
    app, url = server
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "POST /tokenize"} <= labels, labels

    failures, calls = [], []
    started = time.monotonic()
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                response = case.call(base_url=url, timeout=60)
                calls.append(response.status_code)
                if response.status_code >= 500:
                    failures.append((operation.label, mode.value, response.status_code, case.body,
                                     response.text[:300]))

            try:
                check()
            except Unsatisfiable:  # nothing invalid to send: no body, any path string is valid
                assert mode is GenerationMode.NEGATIVE and not operation.body
    assert not failures, failures[:5]
    assert len(calls) > 100 and any(status == 200 for status in calls) and any(status == 400 for status in calls)
    assert time.monotonic() - started < 120

    # still serving, and nothing left in the engine
    with httpx.Client(base_url=url, timeout=30) as client:
        answer = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] <= 3
        assert client.get("/health").status_code == 200
    deadline = time.monotonic() + 20
    while True:
        stats = app.state.engine.stats()
        if stats.num_running == stats.num_waiting == 0 and stats.num_free_kv_blocks == stats.num_kv_blocks:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
    assert app.state.server.admission.waiting == 0
