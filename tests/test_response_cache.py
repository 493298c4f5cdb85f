"""The response cache: its stores and coalescing (`quill.cache`) on their own, then the server in
front of a tiny random model with a tiny tokenizer, over real HTTP."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import tiny_models
from engine_helpers import load_model
from test_server import sse_events, wait_idle
from tokenizer_helpers import tiny_sentencepiece_metadata
from quill.cache import Lease, MemoryStore, Record, ResponseCache, SQLiteStore, cache_key
from quill.config import EngineConfig
from quill.engine.engine import Engine
from quill.server import BackgroundServer, ServerConfig, create_app
from quill.tokenizer import Tokenizer


class _Records(logging.Handler):
    """Collects a logger's messages (caplog depends on propagation, which other tests change)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def cache_warnings():
    logger, records = logging.getLogger("quill.cache"), _Records()
    logger.addHandler(records)
    try:
        yield records.messages
    finally:
        logger.removeHandler(records)


def _record(text: str, stored_at: float = 1000.0) -> Record:
    return Record(text, stored_at)


# ------------------------------------------------------------------------------ stores


def test_memory_store_evicts_least_recently_used_by_count_and_bytes():
    store = MemoryStore(max_entries=3, max_bytes=100)
    for key in "abc":
        store.put(key, _record(key * 10))
    assert store.get("a").body == "a" * 10  # a is now the most recently used
    store.put("d", _record("d" * 10))
    assert store.get("b") is None and store.get("a") is not None and len(store) == 3
    assert (store.evictions, store.bytes) == (1, 30)
    # recency now: c, d, a (the get above); 110 bytes would be too many: c, the least recent, goes
    store.put("e", _record("e" * 70))
    assert [k for k in "acde" if store.get(k)] == ["a", "d", "e"] and store.bytes == 90
    assert store.evictions == 2
    store.put("huge", _record("x" * 101))  # larger than the whole store: not kept, nothing evicted
    assert store.get("huge") is None and store.evictions == 2
    store.put("d", _record("dd"))  # replacing an entry re-counts its bytes
    assert store.bytes == 82


def test_cache_key_depends_on_every_part_but_not_their_order():
    base = dict(model="m", weights="w1", prompts=[[1, 2]], params={"temperature": 0.0, "max_tokens": 8})
    key = cache_key(**base)
    assert cache_key(**dict(reversed(base.items()))) == key
    assert cache_key(**{**base, "params": {"max_tokens": 8, "temperature": 0.0}}) == key
    for change in ({"model": "n"}, {"weights": "w2"}, {"prompts": [[1, 3]]}, {"params": {"temperature": 0.0}}):
        assert cache_key(**{**base, **change}) != key, change


def test_sqlite_store_keeps_entries_across_reopening(tmp_path):
    path = tmp_path / "answers.db"
    store = SQLiteStore(path)
    store.put("k", _record('{"x": "é"}', 5.0))
    store.put("gone", _record("{}"))
    store.delete("gone")
    store.close()
    store.put("late", _record("{}"))  # e.g. a stream ending during shutdown: ignored, the file is untouched
    assert store.get("late") is None and list(tmp_path.iterdir()) == [path]
    reopened = SQLiteStore(path)
    assert reopened.get("k") == _record('{"x": "é"}', 5.0)
    assert reopened.get("gone") is None and reopened.totals() == (1, len('{"x": "é"}'.encode()))
    reopened.close()


def test_sqlite_store_drops_oldest_beyond_its_bound(tmp_path):
    store = SQLiteStore(tmp_path / "a.db", max_entries=3)
    for i in range(5):
        store.put(f"k{i}", _record("{}", stored_at=float(i)))
    assert [k for k in ("k0", "k1", "k2", "k3", "k4") if store.get(k)] == ["k2", "k3", "k4"]
    assert store.evictions == 2
    store.close()


def _filled_database(path: Path) -> int:
    store = SQLiteStore(path)
    for i in range(200):
        store.put(f"key{i}", _record('{"text": "%s"}' % ("y" * 1000)))
    store.close()
    return path.stat().st_size


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_sqlite_file_is_moved_aside_and_rebuilt(tmp_path, cache_warnings, damage):
    path = tmp_path / "answers.db"
    if damage == "garbage":
        path.write_bytes(bytes(range(256)) * 40)
    else:
        size = _filled_database(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    store = SQLiteStore(path)
    assert any("damaged" in m and str(path) in m for m in cache_warnings), cache_warnings
    assert len(list(tmp_path.glob("answers.db.corrupt-*"))) == 1  # kept for a post-mortem
    assert store.get("key1") is None and store.totals() == (0, 0)
    store.put("k", _record("{}"))
    assert store.get("k") is not None
    store.close()


def test_sqlite_entry_failing_its_checksum_is_never_served(tmp_path, cache_warnings):
    path = tmp_path / "answers.db"
    store = SQLiteStore(path)
    store.put("k", _record('{"text": "right"}'))
    with sqlite3.connect(path) as other:  # a damaged row, as if half written by a broken writer
        other.execute("UPDATE responses SET body = ? WHERE key = 'k'", ('{"text": "wro',))
    assert store.get("k") is None
    assert any("checksum" in m for m in cache_warnings)
    assert store.totals() == (0, 0)  # dropped
    store.close()


def test_sqlite_store_with_concurrent_writers_and_readers(tmp_path):
    path = tmp_path / "shared.db"
    SQLiteStore(path).close()
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        store = SQLiteStore(path)  # a connection of its own, as another server process would have
        try:
            for i in range(40):
                key = f"w{index}-{i}"
                store.put(key, _record('{"n": %d}' % i))
                assert store.get(key).body == '{"n": %d}' % i
                assert store.get(f"w{(index + 1) % 4}-{i}") in (None, _record('{"n": %d}' % i))
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    store = SQLiteStore(path)
    assert store.totals()[0] == 160
    store.close()


# ------------------------------------------------------------------------------- cache


def test_ttl_expires_entries(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("quill.cache.time.time", lambda: now[0])
    cache = ResponseCache(MemoryStore(10, 1000), ttl=60)
    cache.put("k", '{"a": 1}')

    async def look() -> dict | Lease:
        return await cache.acquire("k")

    now[0] += 59
    assert asyncio.run(look()) == {"a": 1}
    now[0] += 2
    assert isinstance(asyncio.run(look()), Lease) and len(cache.memory) == 0


def test_identical_requests_are_coalesced_into_one_computation():
    async def run():
        cache = ResponseCache(MemoryStore(10, 10))  # too small to keep the answer: waiters still get it
        first = await cache.acquire("k")
        assert isinstance(first, Lease)
        waiters = [asyncio.ensure_future(cache.acquire("k")) for _ in range(19)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiters)  # waiting for the leader, not computing
        first.settle({"answer": "forty-two"})
        answers = await asyncio.gather(*waiters)
        assert answers == [{"answer": "forty-two"}] * 19
        answers[0]["answer"] = "changed"  # each caller has its own copy
        assert answers[1]["answer"] == "forty-two"
        assert (cache.hits, cache.misses, len(cache.memory)) == (19, 1, 0)

    asyncio.run(run())


def test_waiters_of_a_failed_computation_take_over_and_do_not_hang():
    async def run():
        cache = ResponseCache(MemoryStore(10, 1000))
        leader = await cache.acquire("k")
        waiters = [asyncio.ensure_future(cache.acquire("k")) for _ in range(5)]
        await asyncio.sleep(0)
        waiters[0].cancel()  # a waiter whose client left: the others keep waiting
        await asyncio.sleep(0)
        leader.settle(None)  # e.g. the leader's client disconnected
        leader.settle({"late": True})  # a second settle is ignored
        done, _ = await asyncio.wait(waiters[1:], timeout=5, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(0.05)  # time for any other (wrong) taker to show up
        done = [w for w in waiters[1:] if w.done()]
        assert len(done) == 1 and isinstance(done[0].result(), Lease)  # exactly one takes over
        done[0].result().settle({"answer": 1})
        rest = await asyncio.wait_for(asyncio.gather(*(w for w in waiters[1:] if w is not done[0])), 5)
        assert rest == [{"answer": 1}] * 3
        assert waiters[0].cancelled()

    asyncio.run(run())


# ------------------------------------------------------------------ the server, tiny model

CHAT_TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
TOKENIZER = Tokenizer.from_gguf_metadata(tiny_sentencepiece_metadata())


def _tiny_model(path: Path) -> SimpleNamespace:
    """An engine with a tokenizer, and the path its weights came from (the cache's model identity)."""
    model, config = load_model(path)
    return SimpleNamespace(engine=Engine(model, config, TOKENIZER, EngineConfig(dtype="float32")), path=path)


@contextlib.contextmanager
def serving(path: Path, **config):
    app = create_app(_tiny_model(path), ServerConfig(served_model_name="tiny", chat_template=CHAT_TEMPLATE, **config))
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        yield app, client


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    with serving(tiny_model_dir("llama")) as served:
        yield served


def generated_tokens(app) -> int:
    """Tokens the engine has generated so far (once it is idle, so the count is final)."""
    return wait_idle(app).num_generated_tokens


def completion(prompt: list[int], **fields) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **fields}


def chat(content: str, system: str = "Be brief.", **fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "system", "content": system}, {"role": "user", "content": content}],
            "max_tokens": 8, "temperature": 0, **fields}


def post(client: httpx.Client, body: dict, **kwargs) -> tuple[str, dict]:
    """(X-Quill-Cache, the response's JSON) of a non-streamed request."""
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    # json.dumps escapes what httpx's json= cannot encode (a lone surrogate, which the server refuses)
    response = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"}, **kwargs)
    assert response.status_code == 200, response.text
    return response.headers["x-quill-cache"], response.json()


def test_repeated_greedy_request_is_answered_from_the_cache(tiny):
    app, client = tiny
    body = completion([1, 7, 9, 11], n=2, logprobs=2, echo=True)
    status, first = post(client, body)
    assert status == "miss" and first["usage"]["quill"]["cache_hit"] is False
    before = generated_tokens(app)
    status, second = post(client, body)
    assert status == "hit" and generated_tokens(app) == before  # the engine did not run again
    assert second["choices"] == first["choices"]
    assert second["id"] != first["id"] and second["id"].startswith("cmpl-")
    usage = second["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (first["usage"]["prompt_tokens"], 16)
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"]
    assert usage["quill"]["cache_hit"] is True and usage["quill"]["time_to_first_token"] is None

    status, chat_first = post(client, chat("Hello world"))
    status_again, chat_second = post(client, chat("Hello world"))
    assert (status, status_again) == ("miss", "hit")
    assert chat_second["choices"] == chat_first["choices"] and chat_second["object"] == "chat.completion"


def test_a_hit_costs_nothing_and_reports_the_cost_it_saved(tiny):
    app, client = tiny
    body = completion([3, 1, 4, 15, 9], max_tokens=6)
    status, first = post(client, body)
    computed = first["usage"]["quill"]["cost"]
    assert status == "miss" and computed["self_hosted_usd"] > 0 and computed["saved_usd"] == 0.0
    usage_before, metrics_before = client.get("/v1/usage").json()["data"][0], metric_samples(client)

    for stream in (False, True):
        if stream:
            response = client.post("/v1/completions", json={**body, "stream": True,
                                                            "stream_options": {"include_usage": True}})
            status, usage = response.headers["x-quill-cache"], sse_events(response)[-2]["usage"]
        else:
            status, answer = post(client, body)
            usage = answer["usage"]
        cost = usage["quill"]["cost"]
        assert status == "hit" and usage["quill"]["cache_hit"] is True
        # free on this machine; saves what computing the answer cost; still worth the same on the APIs
        assert cost["self_hosted_usd"] == 0.0 and cost["saved_usd"] == computed["self_hosted_usd"]
        assert cost["reference_usd"] == computed["reference_usd"]

    # hits are not engine work: counted apart in /v1/usage and /metrics, never as tokens or cost
    usage_after, metrics_after = client.get("/v1/usage").json()["data"][0], metric_samples(client)
    for field in ("requests", "prompt_tokens", "completion_tokens", "self_hosted_usd"):
        assert usage_after[field] == usage_before[field], field
    assert usage_after["cache_hits"] == usage_before["cache_hits"] + 2
    assert usage_after["cache_saved_usd"] == pytest.approx(usage_before["cache_saved_usd"]
                                                           + 2 * computed["self_hosted_usd"])
    saved = ("quill:response_cache_saved_dollars_total", (("model_name", "tiny"),))
    assert metrics_after[saved] - metrics_before.get(saved, 0.0) == pytest.approx(2 * computed["self_hosted_usd"])
    for key, value in metrics_after.items():
        if key[0] in ("quill:request_cost_dollars_total", "quill:prompt_tokens_total",
                      "quill:generation_tokens_total"):
            assert value == metrics_before[key], key


def metric_samples(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(client.get("/metrics").text) for sample in family.samples}


def test_any_change_that_can_change_the_answer_misses(tiny):
    app, client = tiny
    base = completion([3, 5, 7, 9])
    post(client, base)
    variants = [{"max_tokens": 9}, {"prompt": [3, 5, 7, 10]}, {"stop_token_ids": [4]}, {"logit_bias": {"5": 3}},
                {"repetition_penalty": 1.2}, {"presence_penalty": 0.5}, {"frequency_penalty": 0.5},
                {"min_tokens": 2}, {"ignore_eos": False}, {"seed": 3}, {"n": 2}, {"logprobs": 0}, {"echo": True},
                {"stop": ["zz"]}, {"stop": ["é"]}, {"skip_special_tokens": False}, {"temperature": 0.5, "seed": 1},
                {"top_k": 5, "seed": 1}, {"top_p": 0.5, "seed": 1}, {"min_p": 0.2, "seed": 1}]
    for change in variants:
        body = {**base, **change}
        assert post(client, body)[0] == "miss", change
        assert post(client, body)[0] == "hit", change  # each variant is cacheable in its own right
    assert post(client, base)[0] == "hit"

    post(client, chat("Hello"))
    for body in (chat("Hello", system="Be verbose."), chat("Hello", max_tokens=7), chat("Hello", logprobs=True),
                 chat("Hello", logprobs=True, top_logprobs=2), chat("Hello Hello")):
        assert post(client, body)[0] == "miss", body


def test_sampled_requests_without_a_seed_are_never_cached(tiny):
    app, client = tiny
    body = completion([2, 4, 6, 8], temperature=0.8)
    for _ in range(2):
        before = generated_tokens(app)
        status, answer = post(client, body)
        assert status == "bypass" and answer["usage"]["quill"]["cache_hit"] is False
        assert generated_tokens(app) == before + 8
    assert [post(client, {**body, "seed": 11})[0] for _ in range(2)] == ["miss", "hit"]


def test_clients_and_the_server_can_opt_out(tiny, tiny_model_dir):
    app, client = tiny
    body = completion([2, 9, 2, 9])
    post(client, body)
    for kwargs in ({"headers": {"Cache-Control": "no-store"}}, {"json": {**body, "cache": False}}):
        before = generated_tokens(app)
        response = client.post("/v1/completions", **{"json": body, **kwargs})
        assert response.headers["x-quill-cache"] == "bypass", kwargs
        assert generated_tokens(app) == before + 8
    assert post(client, body)[0] == "hit"
    with serving(tiny_model_dir("llama"), response_cache=False) as (other, other_client):
        assert [post(other_client, body)[0] for _ in range(2)] == ["bypass", "bypass"]
        assert "quill:response_cache_hits" not in other_client.get("/metrics").text


def _stream(client: httpx.Client, body: dict) -> tuple[str, list]:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = client.post(path, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    return response.headers["x-quill-cache"], sse_events(response)


def _check_stream_shape(events: list, n: int, chat: bool) -> dict[int, str]:
    """A stream's text per choice, after checking what every OpenAI client relies on."""
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["choices"] == []
    texts: dict[int, str] = {}
    finishes: dict[int, int] = {}
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        index = choice["index"]
        if chat:
            assert c["object"] == "chat.completion.chunk"
            if index not in texts:  # the role comes first
                assert choice["delta"] == {"role": "assistant", "content": ""}
            texts[index] = texts.get(index, "") + (choice["delta"].get("content") or "")
        else:
            texts[index] = texts.get(index, "") + choice["text"]
        if choice["finish_reason"]:
            assert index not in finishes  # once per choice, and last
            finishes[index] = choice["finish_reason"]
        else:
            assert index not in finishes
    assert sorted(finishes) == list(range(n))
    return texts


def test_streamed_hit_is_shaped_like_the_live_stream(tiny):
    app, client = tiny
    for body, n, is_chat in ((chat("world Hello", n=2, seed=5, temperature=1.0), 2, True),
                             (completion([5, 6, 7], n=2, logprobs=1, echo=True), 2, False)):
        status, live = _stream(client, body)
        assert status == "miss"
        before = generated_tokens(app)
        status, replayed = _stream(client, body)
        assert status == "hit" and generated_tokens(app) == before
        assert _check_stream_shape(replayed, n, is_chat) == _check_stream_shape(live, n, is_chat)
        assert replayed[0]["id"] != live[0]["id"]
        live_usage, replayed_usage = live[-2]["usage"], replayed[-2]["usage"]
        assert replayed_usage["completion_tokens"] == live_usage["completion_tokens"]
        assert replayed_usage["quill"]["cache_hit"] and not live_usage["quill"]["cache_hit"]
        # the streamed miss also answers the non-streamed request
        status, whole = post(client, body)
        key = "message" if is_chat else None
        texts = [c[key]["content"] if key else c["text"] for c in whole["choices"]]
        assert status == "hit" and texts == [_check_stream_shape(live, n, is_chat)[i] for i in range(n)]
    body = completion([5, 6, 7], n=2, logprobs=1, echo=True)
    _, replayed = _stream(client, body)
    _, live_again = _stream(client, {**body, "cache": False})
    tokens = [c["choices"][0]["logprobs"]["tokens"] for c in replayed[:-2]]
    live_tokens = {}
    for c in live_again[:-2]:
        live_tokens.setdefault(c["choices"][0]["index"], []).extend(c["choices"][0]["logprobs"]["tokens"])
    assert tokens == [live_tokens[0], live_tokens[1]]


def hold_engine(app, monkeypatch) -> threading.Event:
    """Make the engine wait before its next step until the returned event is set."""
    core, resume = app.state.engine.engine, threading.Event()
    step = core.step
    monkeypatch.setattr(core, "step", lambda: resume.wait() and step())
    return resume


def test_concurrent_identical_requests_run_the_model_once(tiny, monkeypatch):
    app, client = tiny
    server = app.state.server
    body = completion([9, 8, 7, 6], max_tokens=200)
    before = generated_tokens(app)
    resume = hold_engine(app, monkeypatch)

    async def fire():
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=60) as http:
            requests = [asyncio.ensure_future(http.post("/v1/completions", json=body)) for _ in range(20)]
            while len(server.admission.active_tasks) < 20:  # all in, while the first is still computing
                await asyncio.sleep(0.005)
            resume.set()
            return await asyncio.gather(*requests)

    responses = asyncio.run(fire())
    assert generated_tokens(app) == before + 200
    assert all(r.status_code == 200 for r in responses)
    assert sorted(r.headers["x-quill-cache"] for r in responses) == ["hit"] * 19 + ["miss"]
    assert len({r.json()["choices"][0]["text"] for r in responses}) == 1
    metrics = client.get("/metrics").text
    for name in ("quill:response_cache_hits_total", "quill:response_cache_misses_total",
                 "quill:response_cache_evictions_total", 'quill:response_cache_bytes{model_name="tiny",store="memory"}',
                 'quill:response_cache_entries{model_name="tiny",store="memory"}'):
        assert name in metrics, name
    hits = next(line for line in metrics.splitlines() if line.startswith("quill:response_cache_hits_total"))
    assert float(hits.split()[-1]) >= 19


def test_waiters_recompute_when_the_leader_disconnects(tiny, monkeypatch):
    app, client = tiny
    server = app.state.server
    body = completion([4, 4, 4, 4], max_tokens=20)
    resume = hold_engine(app, monkeypatch)

    async def scenario():
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=60) as http:
            leader = asyncio.ensure_future(http.post("/v1/completions", json=body))
            await asyncio.sleep(0.1)
            waiter = asyncio.ensure_future(http.post("/v1/completions", json=body))
            while len(server.admission.active_tasks) < 2:  # both handlers are in: the leader's and its waiter's
                await asyncio.sleep(0.005)
            leader.cancel()  # the leader's client leaves before any answer
            with contextlib.suppress(asyncio.CancelledError):
                await leader
            resume.set()
            return await asyncio.wait_for(waiter, 60)

    response = asyncio.run(scenario())
    assert response.headers["x-quill-cache"] == "miss"  # the waiter computed the answer itself
    answer = response.json()
    assert answer["usage"]["completion_tokens"] == 20 and answer["choices"][0]["finish_reason"] == "length"
    wait_idle(app)


def test_sqlite_answers_survive_a_restart_and_not_a_model_change(tmp_path, tiny_model_dir):
    path = str(tmp_path / "answers.db")
    body = chat("Hello", n=2, seed=4, temperature=1.0)
    with serving(tiny_model_dir("llama"), response_cache_path=path) as (app, client):
        status, first = post(client, body)
        assert status == "miss"
    with serving(tiny_model_dir("llama"), response_cache_path=path) as (app, client):
        status, again = post(client, body)
        assert status == "hit" and generated_tokens(app) == 0
        assert again["choices"] == first["choices"]
        assert 'quill:response_cache_entries{model_name="tiny",store="sqlite"} 1.0' in client.get("/metrics").text
    other_model = tiny_models.build_llama(tmp_path / "other-llama", seed=1)  # same name, other weights
    with serving(other_model, response_cache_path=path) as (app, client):
        assert post(client, body)[0] == "miss"


def test_server_starts_over_a_damaged_cache_file(tmp_path, tiny_model_dir, cache_warnings):
    path = tmp_path / "answers.db"
    path.write_bytes(b"not a database, just some bytes" * 100)
    with serving(tiny_model_dir("llama"), response_cache_path=str(path)) as (app, client):
        assert [post(client, completion([1, 2, 3]))[0] for _ in range(2)] == ["miss", "hit"]
    assert any("damaged" in m for m in cache_warnings)
