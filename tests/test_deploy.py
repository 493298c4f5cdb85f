"""Replicas on Ray Serve (quill/deploy), end to end on a local Ray instance and loopback ports.

One Ray instance and one deployment (2 replicas of a tiny model with a tokenizer) serve the whole
module, next to the same model in one process (`quill serve`'s app in a thread) as the reference.
The deployment is reached two ways, as users reach it: through the ingress deployment behind Ray's
HTTP proxy (`serve run`, KubeRay) and through the local ingress in this process (what `quill serve
--replicas` serves).
The tests run in file order: the last ones delete the deployment (a graceful drain), then run
`quill serve --replicas` and `serve run examples/ray-serve.yaml` against the same Ray instance.
Every wait is bounded. Needs the cluster extra (`pip install -e '.[cluster]'`; `make test` has it).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

ray = pytest.importorskip("ray", reason="the cluster extra is not installed: pip install -e '.[cluster]'")
serve = pytest.importorskip("ray.serve")

import tiny_models  # noqa: E402
from quill.bench.servers import free_port  # noqa: E402
from quill.deploy.application import ENGINE_DEPLOYMENT, build_app  # noqa: E402
from quill.deploy.ingress import local_ingress  # noqa: E402
from quill.deploy.settings import ClusterSettings  # noqa: E402
from quill.llm import LLM  # noqa: E402
from quill.server import BackgroundServer, ServerConfig, create_app  # noqa: E402

APP = "quill"
MODEL = "tiny"
EXAMPLE_CONFIG = Path(__file__).parent.parent / "examples" / "ray-serve.yaml"
NO_STORE = {"Cache-Control": "no-store"}  # answered by the engine, not the response cache

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def wait_for(check, timeout: float, what: str):
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except (httpx.HTTPError, KeyError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


def metric(url: str, name: str) -> dict[str, float]:
    """One engine series from /metrics, by replica."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and 'replica="' in line:
            replica = line.split('replica="', 1)[1].split('"', 1)[0]
            values[replica] = float(line.rsplit(" ", 1)[1])
    return values


def settled(url: str, name: str) -> dict[str, float]:
    """An engine series once the replicas' published stats have caught up (two reads agree)."""
    previous = None

    def stable():
        nonlocal previous
        now = metric(url, name)
        agreed, previous = now == previous, now
        if not agreed:
            time.sleep(0.5)  # longer than the deployment's stats interval (0.2 s) plus the ingress's refresh
        return now if agreed else None

    return wait_for(stable, 20, f"{name} to settle")


def app_status() -> str | None:
    application = serve.status().applications.get(APP)
    return None if application is None else str(application.status.value)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """The tiny Llama with a tokenizer and chat template in its directory: replicas load it by path."""
    return tiny_models.add_tiny_tokenizer(tiny_models.build_llama(tmp_path_factory.mktemp("tiny-chat-llama")))


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance with Serve's HTTP proxy on a free loopback port: (url, Ray address)."""
    saved = os.environ.pop("RAY_ADDRESS", None)  # never join a cluster someone else started
    # Logical CPUs: 2 replicas x 1 thread, with room for a replacement while a dead one is cleaned up.
    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}", ray.get_runtime_context().gcs_address
    finally:
        serve.shutdown()
        ray.shutdown()
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


@pytest.fixture(scope="module")
def url(cluster, chat_model) -> str:
    """The deployment: 2 replicas, stats every 0.2 s and health checks every second (for the tests' pace)."""
    base, _ = cluster
    settings = ClusterSettings(model=str(chat_model), engine={"dtype": "float32"}, replicas=2,
                               server=ServerConfig(served_model_name=MODEL), stats_interval_s=0.2,
                               health_check_period_s=1.0, unavailable_timeout_s=30.0)
    serve.run(build_app(settings), name=APP, route_prefix="/")
    wait_for(lambda: len(metric(base, "quill:num_kv_blocks")) == 2, 60, "both replicas' stats")
    return base


@pytest.fixture(scope="module")
def local_url(url) -> str:
    """The same deployment's engine replicas served from this process, as `quill serve --replicas` does."""
    settings = ClusterSettings(model="unused", server=ServerConfig(served_model_name=MODEL), stats_interval_s=0.2)
    with BackgroundServer(local_ingress(serve.get_deployment_handle(ENGINE_DEPLOYMENT, APP), settings)) as running:
        yield running.url


@pytest.fixture(params=["proxy", "local"])
def front(request, url) -> str:
    """Each way in: Ray's proxy and the ingress deployment, or the local ingress."""
    return url if request.param == "proxy" else request.getfixturevalue("local_url")


@pytest.fixture(scope="module")
def reference(chat_model):
    """The same model served by one process: what the replicas must answer like."""
    app = create_app(LLM(chat_model, dtype="float32"), ServerConfig(served_model_name=MODEL, response_cache=False))
    with BackgroundServer(app) as running:
        yield running.url


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60,
                         default_headers=NO_STORE)


# ------------------------------------------------------------------------------ the application


def test_settings_reach_ray_serve_deployment_options():
    """Autoscaling, threads (Ray CPUs and OpenMP), health checks and the drain time, as Ray Serve
    will apply them to the engine deployment (built without starting Ray)."""
    settings = ClusterSettings(model="m", threads_per_replica=2, health_check_period_s=3.0,
                               autoscaling={"min_replicas": 2, "max_replicas": 4, "target_ongoing_requests": 3},
                               server=ServerConfig(shutdown_grace=7.0))
    ingress = build_app(settings)._bound_deployment
    engine = ingress.init_args[0]._bound_deployment
    assert engine.name == ENGINE_DEPLOYMENT
    config = engine._deployment_config
    scaling = config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (2, 4, 3.0)
    assert engine.ray_actor_options["num_cpus"] == 2
    assert engine.ray_actor_options["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "2"
    assert config.health_check_period_s == 3.0
    assert config.graceful_shutdown_timeout_s > settings.server.shutdown_grace  # the ingress drains first
    assert ingress.init_args[1] == settings


# ------------------------------------------------------------------------------ like one process


def answers(base: str) -> dict:
    api = client(base)
    messages = [{"role": "user", "content": "Hello world"}]
    chat = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                       extra_body={"ignore_eos": True})
    stream = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    completion = api.completions.create(model=MODEL, prompt="Hello", max_tokens=12, n=2, temperature=1.0, seed=7,
                                        logprobs=2)
    return {
        "chat": (chat.choices[0].message.content, chat.choices[0].finish_reason, chat.usage.completion_tokens),
        "stream": ("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                   [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage.completion_tokens),
        "completion": [(c.index, c.text, c.finish_reason, c.logprobs.tokens, c.logprobs.token_logprobs)
                       for c in completion.choices],
    }


def test_replicas_answer_the_openai_client_like_one_process(front, reference):
    replicated, alone = answers(front), answers(reference)
    assert replicated["chat"][2] == 24 and replicated["chat"][0]
    assert replicated["stream"] == replicated["chat"]  # the stream's deltas add up to the answer
    assert replicated == alone


def test_endpoints_and_errors_match_one_process(front, reference):
    def responses(base: str) -> list:
        with httpx.Client(base_url=base, timeout=30, headers=NO_STORE) as http:
            calls = [
                http.get("/v1/models"), http.get(f"/v1/models/{MODEL}"), http.get("/v1/models/nope"),
                http.post("/tokenize", json={"prompt": "Hello world"}),
                http.post("/detokenize", json={"tokens": [271, 276]}),
                http.get("/health"), http.get("/version"),
                http.post("/v1/completions", json={"model": MODEL, "prompt": [5] * 300, "max_tokens": 4}),
                http.post("/v1/completions", json={"model": MODEL, "prompt": [5000], "max_tokens": 4}),
                http.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
                http.post("/v1/chat/completions", json={"model": MODEL, "messages": [], "stream": True}),
                http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": -1}),
            ]
        return [(r.status_code, _without_times(r.json())) for r in calls]

    replicated = responses(front)
    assert [status for status, _ in replicated] == [200, 200, 404, 200, 200, 200, 200, 400, 400, 404, 400, 400]
    assert replicated == responses(reference)
    assert replicated[7][1]["error"]["code"] == "context_length_exceeded"


def _without_times(body: dict) -> dict:
    """A response body without what differs between servers by nature (creation times)."""
    if isinstance(body, dict) and "data" in body:
        return {**body, "data": [{k: v for k, v in card.items() if k != "created"} for card in body["data"]]}
    return {k: v for k, v in body.items() if k != "created"} if isinstance(body, dict) else body


def test_response_cache_answers_repeats_in_the_ingress(url):
    body = {"model": MODEL, "prompt": "Hello world, once more", "max_tokens": 8, "temperature": 0}
    first = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    again = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert first.headers["X-Quill-Cache"] == "miss" and again.headers["X-Quill-Cache"] == "hit"
    assert again.json()["choices"] == first.json()["choices"]


def test_metrics_show_each_replica_and_the_ingress(front):
    named = {a["name"].rsplit("#", 1)[1] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{APP}#{ENGINE_DEPLOYMENT}#")}
    assert len(named) == 2
    wait_for(lambda: set(metric(front, "quill:num_kv_blocks")) == named, 10, "a series for each replica")
    text = httpx.get(f"{front}/metrics", timeout=10).text
    assert 'quill:http_requests_total{endpoint="/v1/completions",status="200"}' in text  # the ingress's own
    assert "quill:time_to_first_token_seconds_bucket" in text


# ------------------------------------------------------------------------------ routing


def test_a_conversation_stays_on_one_replica(url):
    """Each turn's prompt extends the previous one; with prefix affinity they all reach the replica
    that has the conversation in its prefix cache (seen in each replica's prefix-cache counters)."""
    before = settled(url, "quill:prefix_cache_queries_total")
    api = client(url)
    messages = [{"role": "user", "content": "Hello world, this is conversation number seven. Hello!"}]
    prompt_tokens, cached = 0, []
    for turn in range(4):
        answer = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                             extra_body={"ignore_eos": True})
        prompt_tokens += answer.usage.prompt_tokens
        cached.append(answer.usage.prompt_tokens_details.cached_tokens)
        messages += [{"role": "assistant", "content": answer.choices[0].message.content},
                     {"role": "user", "content": f"Hello again, world {turn}."}]

    after = settled(url, "quill:prefix_cache_queries_total")
    growth = {replica: after[replica] - before.get(replica, 0) for replica in after}
    assert sorted(growth.values()) == [0, prompt_tokens]  # every turn looked up on the same replica
    assert all(tokens > 0 for tokens in cached[1:])  # and found the earlier turns there


def test_a_burst_of_requests_is_split_evenly(front):
    """Eight requests sent at once, prompts of the same length too short to share a KV block: each
    replica gets at least three (each replica's prefix-cache lookups grow by that many prompts'
    tokens). Not always four: Ray Serve may give the replica ranked for one waiting request to
    another, so a burst can split 3:5 (the exact counting is tested in test_deploy_parts.py); what
    the router prevents is a burst piling onto one replica."""
    prompt_tokens = 4
    before = settled(front, "quill:prefix_cache_queries_total")

    async def burst():
        async with httpx.AsyncClient(base_url=front, timeout=60, headers=NO_STORE) as http:
            bodies = [{"model": MODEL, "prompt": [5, 6, 7, 10 + i], "max_tokens": 100, "ignore_eos": True}
                      for i in range(8)]
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for body in bodies))

    assert [r.status_code for r in asyncio.run(burst())] == [200] * 8
    after = settled(front, "quill:prefix_cache_queries_total")
    growth = sorted(after[r] - before.get(r, 0) for r in after)
    assert len(growth) == 2 and sum(growth) == 8 * prompt_tokens and growth[0] >= 3 * prompt_tokens, growth


# ------------------------------------------------------------------------------ failures


async def _stream(http: httpx.AsyncClient, index: int, max_tokens: int, first_chunk: asyncio.Event | None = None):
    """One streamed completion: ("done", finish_reason, tokens) or ("error", message)."""
    body = {"model": MODEL, "prompt": f"Hello world {index}", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    finish, tokens = None, None
    async with http.stream("POST", "/v1/completions", json=body, headers=NO_STORE) as response:
        if response.status_code != 200:
            return ("error", response.status_code, (await response.aread()).decode())
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                return ("error", event["error"]["type"], event["error"]["message"])
            if first_chunk is not None:
                first_chunk.set()
            for choice in event["choices"]:
                finish = choice["finish_reason"] or finish
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return ("done", finish, tokens)


def _replica_pid(replica: str) -> int:
    actor = ray.get_actor(f"SERVE_REPLICA::{APP}#{ENGINE_DEPLOYMENT}#{replica}", namespace="serve")
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


def test_a_killed_replica_fails_its_requests_cleanly_and_is_replaced(url):
    async def load_and_kill():
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            streams = [asyncio.ensure_future(_stream(http, i, 220)) for i in range(8)]
            running = await asyncio.to_thread(  # off the event loop, which sends the requests meanwhile
                wait_for, lambda: {r: n for r, n in metric(url, "quill:num_requests_running").items() if n},
                20, "requests running on a replica")
            victim = max(running, key=running.get)
            os.kill(await asyncio.to_thread(_replica_pid, victim), signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*streams), timeout=90)  # nothing hangs
            return victim, results

    victim, results = asyncio.run(load_and_kill())
    failed = [r for r in results if r[0] == "error"]
    assert failed, results  # the victim was running requests: they cannot all have been saved
    for result in results:
        if result[0] == "done":
            assert result[1:] == ("length", 220)  # whole answers, or...
        else:  # ...a clear error, never a truncated success
            assert result[1] == "server_error" and "replica" in result[2], result
    # Ray Serve replaces the replica; the ingress sees the new one and forgets the dead one.
    wait_for(lambda: len(metric(url, "quill:num_kv_blocks")) == 2 and victim not in metric(url, "quill:num_kv_blocks"),
             90, "a replacement replica")
    assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok"}
    again = asyncio.run(_run_streams(url, 2, 16))
    assert again == [("done", "length", 16)] * 2


async def _run_streams(base: str, count: int, max_tokens: int) -> list:
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        return await asyncio.gather(*(_stream(http, i, max_tokens) for i in range(count)))


# ------------------------------------------------------------------------------ shutdown and other starts


def test_deleting_the_deployment_drains_requests_in_flight(url):
    async def delete_while_streaming():
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            started = [asyncio.Event() for _ in range(6)]
            streams = [asyncio.ensure_future(_stream(http, i, 220, started[i])) for i in range(6)]
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), timeout=60)
            unfinished = sum(not s.done() for s in streams)
            await asyncio.to_thread(serve.delete, APP, False)  # what `quill serve --replicas` does on SIGTERM
            return unfinished, await asyncio.wait_for(asyncio.gather(*streams), timeout=90)

    unfinished, results = asyncio.run(delete_while_streaming())
    assert unfinished > 0  # the deletion began while answers were still streaming
    assert results == [("done", "length", 220)] * 6
    wait_for(lambda: app_status() is None, 60, "the application to be deleted")


def test_quill_serve_replicas_joins_a_cluster_and_stops_on_sigterm(cluster, chat_model):
    """It serves HTTP itself, on its own port (the cluster's proxy keeps the other)."""
    _, address = cluster
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "quill.cli", "serve", str(chat_model), "--dtype", "float32", "--replicas", "2",
               "--ray-address", address, "--port", str(port), "--served-model-name", MODEL]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: httpx.get(f"{base}/health", timeout=5).status_code == 200 or process.poll() is not None,
                 120, "quill serve --replicas to start")
        assert process.poll() is None, process.stderr.read()
        answer = client(base).completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
        assert answer.choices[0].finish_reason in ("stop", "length")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert app_status() is None  # its application was deleted; the cluster it joined keeps running


def test_a_sigterm_to_the_whole_process_group_drains_a_local_instance(chat_model):
    """`timeout`, `kill -- -PGID` and systemd signal the group, Ray's daemons included: the stream in
    flight still finishes, and the server exits promptly (it used to wait a minute for a dead GCS)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "quill.cli", "serve", str(chat_model), "--dtype", "float32", "--replicas", "1",
               "--threads-per-replica", "1", "--port", str(port), "--served-model-name", MODEL]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # a local instance of its own
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        wait_for(lambda: process.poll() is not None or httpx.get(f"{base}/health", timeout=5).status_code == 200,
                 180, "quill serve --replicas to start")
        assert process.poll() is None, process.stderr.read()
        stream = client(base).completions.create(model=MODEL, prompt="Hello", max_tokens=60, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        first = next(iter(stream))
        os.killpg(process.pid, signal.SIGTERM)
        started = time.monotonic()
        finishes = [first.choices[0].finish_reason] + [c.choices[0].finish_reason for c in stream if c.choices]
        assert finishes[-1] == "length"  # drained, not cut
        assert process.wait(timeout=60) == 0 and time.monotonic() - started < 45
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_quill_serve_replicas_refuses_a_missing_model_before_starting_ray():
    command = [sys.executable, "-m", "quill.cli", "serve", "/nonexistent/model.gguf", "--replicas", "2",
               "--port", str(free_port())]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "error: no model called '/nonexistent/model.gguf'" in done.stderr and "Traceback" not in done.stderr


def test_quill_serve_replicas_refuses_a_taken_port_before_starting_ray(chat_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        command = [sys.executable, "-m", "quill.cli", "serve", str(chat_model), "--replicas", "1",
                   "--port", str(taken.getsockname()[1])]
        started = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "error: cannot serve on 127.0.0.1:" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - started < 30  # no replica was started first


def test_replicas_that_cannot_load_the_model_fail_start_up_with_its_error(cluster):
    """On a joined cluster the replicas resolve the model themselves: Ray Serve gives up after its
    retries, and `quill serve` says why instead of printing Ray's traceback."""
    _, address = cluster
    command = [sys.executable, "-m", "quill.cli", "serve", "/nonexistent/model.gguf", "--replicas", "1",
               "--ray-address", address, "--port", str(free_port())]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stderr
    assert "error: the replicas did not start" in done.stderr and "no model called" in done.stderr, done.stderr
    assert app_status() is None


@pytest.mark.real_model
def test_serve_run_with_the_example_config(cluster, smollm2_gguf):
    """The example config as it is (SmolLM2, 2 replicas). Serve already runs on this cluster, so its
    proxy keeps the test's port rather than the config's 8000."""
    base, address = cluster
    serve_cli = Path(sys.executable).parent / "serve"
    try:
        subprocess.run([str(serve_cli), "run", "--address", address, "--non-blocking", str(EXAMPLE_CONFIG)],
                       check=True, timeout=120, capture_output=True)
        wait_for(lambda: app_status() == "RUNNING", 180, "the example application to run")
        answer = client(base).chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Name the capital of France."}], max_tokens=8,
            temperature=0)
        assert answer.choices[0].message.content.strip()
    finally:
        serve.delete(APP)
