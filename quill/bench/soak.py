"""A soak: a server under clients that behave and clients that do not, for a fixed time, watched
for what must not happen (a 5xx, a dropped connection, memory that keeps growing, slots or KV
blocks still held when the traffic stops).

`clients` loops run side by side until the time is up. Each sends one request after another, of
four kinds in a fixed rotation (so that every kind occurs in a short run too):

- normal: a streaming chat request with a mixed prompt length and sampling, read to its end (TTFT
  and inter-token latencies are timed as the client sees them, `quill.bench.client`);
- disconnect: the same, left after a few chunks;
- stall: a raw socket that sends a streaming request that would run long and write a lot (no
  max_tokens, four choices with logprobs, ignore_eos) and then reads nothing,
  as a client that stopped reading would, and closes after `stall_seconds` (the server is expected
  to cut it: `quill:requests_cut_short`);
- invalid: a request the server must refuse with a 4xx.

Meanwhile `/metrics` is sampled every `sample_every` seconds (resident memory, running and waiting
sequences, KV-cache use). The report has the requests and errors by kind, the samples, TTFT and
inter-token percentiles per `window` seconds, and the server's metrics once it is idle again.
`benchmarks/soak.py` runs it from the command line; tests/test_soak.py runs a short one in the suite.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from quill.bench.client import RequestResult, Target, fetch_model, send_request
from quill.bench.report import percentile
from quill.bench.workload import RequestSpec, story_request

KINDS = ("normal", "disconnect", "normal", "stall", "normal", "invalid")  # each client's rotation

# Requests the server must refuse: each with the status expected (the body is what makes it wrong).
_INVALID: list[tuple[int, str, dict | bytes]] = [
    (400, "/v1/completions", {"prompt": "hi", "max_tokens": True}),
    (400, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}),
    (400, "/v1/completions", b'{"prompt": "a\xff", "max_tokens": 2}'),
    (400, "/v1/completions", {"prompt": "hi", "temperature": -1}),
    (400, "/v1/completions", {"prompt": "hi", "n": 100_000}),
    (404, "/v1/completions", {"prompt": "hi", "model": "no-such-model"}),
    (400, "/v1/chat/completions", {"messages": []}),
]


@dataclass(frozen=True)
class SoakPlan:
    seconds: float
    clients: int = 16
    prompt_words: tuple[int, ...] = (0, 40, 300)  # mixed prompt lengths (words of notes)
    max_tokens: tuple[int, ...] = (8, 32, 96)
    disconnect_after_chunks: int = 3
    stall_seconds: float = 10.0  # how long a stalled reader holds its socket
    sample_every: float = 2.0
    window: float = 60.0  # seconds per row of the latency table
    api_key: str | None = None
    seed: int = 0


@dataclass
class SoakLog:
    started: float
    counts: Counter = field(default_factory=Counter)  # (kind, outcome) -> requests
    errors: list[str] = field(default_factory=list)  # the first few unexpected outcomes, verbatim
    timed: list[tuple[float, RequestResult]] = field(default_factory=list)  # (sent at, normal result)
    samples: list[dict] = field(default_factory=list)

    def count(self, kind: str, outcome: str, detail: str | None = None) -> None:
        self.counts[kind, outcome] += 1
        if detail and outcome not in ("ok", "refused", "busy", "left", "held") and len(self.errors) < 20:
            self.errors.append(f"{kind}: {outcome}: {detail}")


async def run_soak(base_url: str, plan: SoakPlan) -> dict:
    """Run the soak against a server at `base_url` and return its report (see the module docstring)."""
    headers = {"Authorization": f"Bearer {plan.api_key}"} if plan.api_key else {}
    limits = httpx.Limits(max_connections=plan.clients + 8)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=httpx.Timeout(300, connect=30),
                                 limits=limits) as http:
        model = await fetch_model(http)
        log = SoakLog(started=time.monotonic())
        stop = log.started + plan.seconds
        sampler = asyncio.create_task(_sample(http, plan, log))
        await asyncio.gather(*(_client(http, base_url, model, plan, log, index, stop) for index in range(plan.clients)))
        idle_after = await _wait_idle(http, plan)
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        final = await server_metrics(http)
    return _report(plan, log, final, idle_after)


async def _client(http: httpx.AsyncClient, base_url: str, model: str, plan: SoakPlan, log: SoakLog, index: int,
                  stop: float) -> None:
    rng = random.Random(plan.seed * 1000 + index)
    turn = index  # clients start at different points of the rotation
    while time.monotonic() < stop:
        kind = KINDS[turn % len(KINDS)]
        turn += 1
        if kind in ("normal", "disconnect"):
            words, max_tokens = rng.choice(plan.prompt_words), rng.choice(plan.max_tokens)
            spec = story_request(turn * plan.clients + index, words, max_tokens)
            # Mixed sampling; never from the response cache, so that every request reaches the engine.
            extra = {"top_p": rng.choice([1.0, 0.9]), "seed": rng.randrange(1 << 20), "cache": False}
            target = Target(base_url, model, temperature=rng.choice([0.0, 0.7, 1.0]), extra_body=extra)
            if kind == "normal":
                await _normal(http, target, spec, log)
            else:
                await _disconnect(http, target, spec, plan, log)
        elif kind == "stall":
            await _stall(base_url, model, plan, log)
        else:
            await _invalid(http, model, rng, log)


async def _normal(http: httpx.AsyncClient, target: Target, spec: RequestSpec, log: SoakLog) -> None:
    sent = time.monotonic()
    result = await send_request(http, target, spec)
    if result.ok:
        log.timed.append((sent - log.started, result))
        log.count("normal", "ok")
    else:
        log.count("normal", _failure(result.error or ""), result.error)


def _failure(error: str) -> str:
    """What kind of failure a `send_request` error is: a status (5xx, 429 "busy", another 4xx), a
    connection that broke or a stream that ended without its finish ("dropped"), or an error event."""
    if error.startswith("HTTP "):
        status = int(error.split()[1].rstrip(":"))
        return "5xx" if status >= 500 else "busy" if status == 429 else "4xx"
    exception = error.split(":", 1)[0]
    if hasattr(httpx, exception) or error.startswith("the stream ended without"):
        return "dropped"
    return "bad_stream" if exception == "JSONDecodeError" else "error_event"


async def _disconnect(http: httpx.AsyncClient, target: Target, spec: RequestSpec, plan: SoakPlan, log: SoakLog) -> None:
    path = "/v1/chat/completions"
    body = {"model": target.model, "messages": spec.messages, "max_tokens": spec.max_tokens, "stream": True,
            "ignore_eos": True, **target.extra_body}
    try:
        async with http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                outcome = "5xx" if response.status_code >= 500 else "busy" if response.status_code == 429 else "4xx"
                log.count("disconnect", outcome, f"HTTP {response.status_code}")
                return
            chunks = 0
            async for line in response.aiter_lines():
                chunks += line.startswith("data:")
                if chunks >= plan.disconnect_after_chunks:
                    break
        log.count("disconnect", "left")
    except httpx.HTTPError as exc:
        log.count("disconnect", "dropped", f"{type(exc).__name__}: {exc}")


async def _stall(base_url: str, model: str, plan: SoakPlan, log: SoakLog) -> None:
    error = await stalled_reader(base_url, model, plan.stall_seconds, plan.api_key)
    # whether the server cut a held one shows in its metrics (requests_cut_short)
    log.count("stall", "dropped" if error else "held", error)


async def stalled_reader(base_url: str, model: str, seconds: float, api_key: str | None = None, *,
                         choices: int = 4, logprobs: int | None = 20) -> str | None:
    """A client that sends a streaming request and reads nothing for `seconds` (a small receive
    window, so that the connection fills after a few kilobytes, as a slow link's would after more).
    Returns None, or the socket error that ended it early."""
    url = urlsplit(base_url)
    # No max_tokens: the server's default applies, as for a client that forgot it. By default four
    # choices with the top 20 logprobs make about 6 KB of events a step: the ~100 KB the connection
    # holds (socket buffers, the transport's) are full within a few dozen steps, even of a tiny
    # model's short window. One plain choice costs the server what a reading client costs.
    fields = {"n": choices} | ({"logprobs": logprobs} if logprobs else {})
    body = json.dumps({"model": model, "prompt": "Tell me everything.", **fields,
                       "ignore_eos": True, "stream": True, "cache": False}).encode()
    auth = f"Authorization: Bearer {api_key}\r\n".encode() if api_key else b""
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n%s"
               b"Content-Length: %d\r\n\r\n%s" % (url.hostname.encode(), auth, len(body), body))
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (url.hostname, url.port or 80))
        await loop.sock_sendall(sock, request)
        await asyncio.sleep(seconds)  # never reading
        return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        sock.close()


async def _invalid(http: httpx.AsyncClient, model: str, rng: random.Random, log: SoakLog) -> None:
    status, path, body = rng.choice(_INVALID)
    if isinstance(body, dict):
        body = json.dumps({"model": model, **body}).encode()
    try:
        response = await http.post(path, content=body, headers={"Content-Type": "application/json"})
    except httpx.HTTPError as exc:
        log.count("invalid", "dropped", f"{type(exc).__name__}: {exc}")
        return
    if response.status_code == status:
        log.count("invalid", "refused")
    else:
        outcome = "5xx" if response.status_code >= 500 else "wrong_status"
        log.count("invalid", outcome, f"{path} expected {status}, got {response.status_code}: {response.text[:200]}")


# ---------------------------------------------------------------------------- the server's side


async def server_metrics(http: httpx.AsyncClient) -> dict[str, float]:
    """The server's /metrics as {name{labels}: value} (comments left out)."""
    response = await http.get("/metrics")
    response.raise_for_status()
    values = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                values[name] = float(value)
    return values


def _gauge(metrics: dict[str, float], name: str) -> float | None:
    """The first series of `name` (the gauges sampled here have one per model)."""
    return next((value for key, value in metrics.items() if key == name or key.startswith(name + "{")), None)


async def _sample(http: httpx.AsyncClient, plan: SoakPlan, log: SoakLog) -> None:
    while True:
        with contextlib.suppress(httpx.HTTPError):
            metrics = await server_metrics(http)
            log.samples.append({"t": round(time.monotonic() - log.started, 2),
                                "rss_bytes": _gauge(metrics, "process_resident_memory_bytes"),
                                "running": _gauge(metrics, "quill:num_requests_running"),
                                "waiting": _gauge(metrics, "quill:num_requests_waiting"),
                                "kv_cache_usage": _gauge(metrics, "quill:kv_cache_usage_perc")})
        await asyncio.sleep(plan.sample_every)


async def _wait_idle(http: httpx.AsyncClient, plan: SoakPlan, timeout: float = 60.0) -> float | None:
    """Seconds until the server reports no running or waiting sequence after the traffic stopped
    (stalled readers may be being cut still); None if it never did within `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        metrics = await server_metrics(http)
        if not _gauge(metrics, "quill:num_requests_running") and not _gauge(metrics, "quill:num_requests_waiting"):
            return time.monotonic() - started
        await asyncio.sleep(0.25)
    return None


# ---------------------------------------------------------------------------- the report


def _report(plan: SoakPlan, log: SoakLog, final: dict[str, float], idle_after: float | None) -> dict:
    by_kind: dict[str, dict[str, int]] = {}
    for (kind, outcome), count in sorted(log.counts.items()):
        by_kind.setdefault(kind, {})[outcome] = count
    failures: Counter = Counter()
    for (_, outcome), count in log.counts.items():
        if outcome in ("5xx", "dropped", "wrong_status", "error_event", "bad_stream", "4xx"):
            failures[outcome] += count
    return {
        "plan": {k: v for k, v in vars(plan).items() if k != "api_key"},
        "requests": sum(log.counts.values()), "by_kind": by_kind, "failures": dict(failures),
        "first_errors": log.errors, "windows": _windows(log, plan.window), "samples": log.samples,
        "rss_mib": _rss_summary(log.samples),
        "idle_after_seconds": idle_after,
        "final": {"running": _gauge(final, "quill:num_requests_running"),
                  "waiting": _gauge(final, "quill:num_requests_waiting"),
                  "kv_cache_usage": _gauge(final, "quill:kv_cache_usage_perc"),
                  "rss_bytes": _gauge(final, "process_resident_memory_bytes"),
                  "cut_short": cut_short_by_reason(final)},
    }


def cut_short_by_reason(metrics: dict[str, float]) -> dict[str, float]:
    """`quill:requests_cut_short_total` from `server_metrics`, by reason (idle, buffer_full, ...)."""
    return {key.split('reason="')[1].split('"')[0]: value for key, value in metrics.items()
            if key.startswith("quill:requests_cut_short_total{")}


def _windows(log: SoakLog, window: float) -> list[dict]:
    """TTFT and inter-token percentiles (ms) of the normal requests sent in each `window` seconds."""
    rows: dict[int, list[RequestResult]] = {}
    for sent, result in log.timed:
        rows.setdefault(int(sent // window), []).append(result)
    table = []
    for index in sorted(rows):
        results = rows[index]
        ttfts = [r.ttft * 1000 for r in results if r.ttft is not None]
        itls = [gap * 1000 for r in results for gap in r.itls]
        table.append({"from_s": index * window, "requests": len(results),
                      "ttft_p50_ms": percentile(ttfts, 0.5), "ttft_p99_ms": percentile(ttfts, 0.99),
                      "itl_p50_ms": percentile(itls, 0.5), "itl_p99_ms": percentile(itls, 0.99)})
    return table


def _rss_summary(samples: list[dict]) -> dict:
    rss = [s["rss_bytes"] / (1 << 20) for s in samples if s.get("rss_bytes")]
    if not rss:
        return {}
    return {"start": round(rss[0], 1), "middle": round(rss[len(rss) // 2], 1), "end": round(rss[-1], 1),
            "max": round(max(rss), 1)}


def problems(report: dict) -> list[str]:
    """What the soak must not see, in words (benchmarks/soak.py's exit status; tests/test_soak.py)."""
    found = [f"{count} x {kind}" for kind, count in report["failures"].items()]
    final = report["final"]
    if report["idle_after_seconds"] is None or final["running"] or final["waiting"]:
        found.append(f"sequences still held after the traffic: {final}")
    if final["kv_cache_usage"]:
        found.append(f"KV cache still in use after the traffic: {final['kv_cache_usage']}")
    return found


def format_soak(report: dict) -> str:
    """The report as a few lines of text."""
    lines = [f"requests: {report['requests']}  by kind: {json.dumps(report['by_kind'])}",
             f"failures: {report['failures'] or 'none'}",
             f"RSS MiB (start / middle / end / max): {report['rss_mib']}",
             f"idle {report['idle_after_seconds']} s after the traffic; final: {report['final']}",
             "window_s  requests  ttft_p50  ttft_p99  itl_p50  itl_p99 (ms)"]
    for row in report["windows"]:
        cells = [row[k] for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")]
        lines.append(f"{row['from_s']:>8.0f}  {row['requests']:>8}  " +
                     "  ".join("       -" if c is None else f"{c:8.1f}" for c in cells))
    lines += report["first_errors"][:5]
    return "\n".join(lines)
