"""`quill bench`: workloads, arrivals, per-level numbers, and a whole run against a live tiny server
that writes a JSON report and PNG plots."""
from __future__ import annotations

import json

import httpx
import pytest

from engine_helpers import tiny_text_engine
from quill import cli
from quill.bench.client import RequestResult
from quill.bench.command import _split_label
from quill.bench.report import format_report, percentile, summarize_level
from quill.bench.servers import llama_server_slot_context, peak_rss_mb
from quill.bench.workload import WorkloadError, load_jsonl, poisson_arrivals, synthetic_workload, take
from quill.cost import REFERENCE_PRICES
from quill.server import BackgroundServer, ServerConfig, create_app

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_synthetic_workload_prompts_are_distinct_from_the_start():
    specs = synthetic_workload(30, prompt_words=10, max_tokens=7)
    texts = [spec.messages[0]["content"] for spec in specs]
    assert len(set(texts)) == 30 and all(spec.max_tokens == 7 for spec in specs)
    assert len({text.split(":")[0] for text in texts}) == 30  # "Reader N took these notes"
    assert all(spec.prompt == spec.messages[0]["content"] for spec in specs)
    assert [s.prompt for s in take(specs, 29, 3)] == [texts[29], texts[0], texts[1]]


def test_jsonl_workload(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text('{"prompt": "Hi", "max_tokens": 3}\n\n{"messages": [{"role": "user", "content": "Yo"}]}\n')
    first, second = load_jsonl(path, default_max_tokens=50)
    assert (first.prompt, first.messages, first.max_tokens) == ("Hi", [{"role": "user", "content": "Hi"}], 3)
    assert (second.prompt, second.max_tokens) == (None, 50)
    for bad in ('{"max_tokens": 3}', "not json", '{"prompt": 5}', ""):
        path.write_text(bad)
        with pytest.raises(WorkloadError):
            load_jsonl(path, 50)


def test_poisson_arrivals():
    times = poisson_arrivals(rate=4.0, count=4000, seed=1)
    assert times[0] == 0.0 and times == sorted(times)
    assert times[-1] / (len(times) - 1) == pytest.approx(0.25, rel=0.05)  # mean gap 1 / rate
    assert poisson_arrivals(4.0, 10, seed=1) == times[:10]  # reproducible


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.9), percentile(values, 0.99)) == (50.0, 90.0, 99.0)
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and percentile([], 0.5) is None


def test_level_summary():
    results = [RequestResult(ok=True, ttft=0.1, e2e=1.0, itls=[0.02, 0.04], output_tokens=100, prompt_tokens=50),
               RequestResult(ok=True, ttft=0.7, e2e=2.0, itls=[0.03], output_tokens=100, prompt_tokens=50),
               RequestResult(ok=False, error="HTTP 500: b'boom'")]
    level = summarize_level(results, duration=4.0, concurrency=2, rate=None, slo_ttft=0.5, hourly_cost=3.6,
                            reference_prices=REFERENCE_PRICES)
    assert (level["requests"], level["completed"], level["failed"]) == (3, 2, 1)
    assert level["errors"] == ["HTTP 500: b'boom'"]
    assert level["requests_per_s"] == 0.5 and level["output_tokens_per_s"] == 50.0
    assert level["ttft_s"] == {"p50": 0.1, "p90": 0.7, "p99": 0.7}
    assert level["itl_s"] == {"p50": 0.03, "p99": 0.04}
    assert level["goodput_requests_per_s"] == 0.25 and level["slo_attainment"] == pytest.approx(1 / 3)
    # 4 s at $3.60/hour is $0.004, for 200 output tokens: $20 per 1M
    assert level["cost_per_1m_output_tokens_usd"] == pytest.approx(20.0)
    assert level["traffic_cost_usd"]["self-hosted"] == pytest.approx(0.004)
    assert level["traffic_cost_usd"]["gpt-4o"] == pytest.approx((100 * 0.0025 + 200 * 0.01) / 1000)
    unreported = summarize_level([RequestResult(ok=True, ttft=0.1, e2e=1.0, output_tokens=5)], 1.0, concurrency=1,
                                 rate=None, slo_ttft=0.5, hourly_cost=0.1, reference_prices=REFERENCE_PRICES)
    assert unreported["prompt_tokens"] is None and unreported["traffic_cost_usd"]["gpt-4o"] is None
    run = {"label": "x", "levels": [level], "slo": {"ttft_s": 0.5}, "hourly_cost_usd": 3.6}
    table = format_report([run])
    assert "TTFT p50 ms" in table and "goodput" in table and "x at 2: 1 failed" in table


def test_compare_labels():
    assert _split_label("llama=http://127.0.0.1:8001") == ("llama", "http://127.0.0.1:8001")
    assert _split_label("http://host:1/?a=b") == (None, "http://host:1/?a=b")
    assert _split_label("old=runs/a=b/report.json") == ("old", "runs/a=b/report.json")
    assert _split_label("runs/a=b/report.json") == (None, "runs/a=b/report.json")


def test_bench_options():
    args = cli.build_parser().parse_args(["bench", "--url", "http://x"])
    assert (args.concurrency, args.rate, args.max_tokens, args.slo_ttft_ms) == ([1, 4, 16, 32], None, 128, 500.0)
    args = cli.build_parser().parse_args(["bench", "--start", "smollm2", "--rate", "0.5,2", "--compare", "a=b.json"])
    assert (args.rate, args.compare) == ([0.5, 2.0], ["a=b.json"])
    for bad in (["bench"], ["bench", "--url", "u", "--start", "m"], ["bench", "--url", "u", "--concurrency", "0"],
                ["bench", "--url", "u", "--concurrency", "1", "--rate", "2"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(bad)


@pytest.fixture(scope="module")
def server_url(tiny_model_dir):
    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    app = create_app(tiny_text_engine(tiny_model_dir("llama")), ServerConfig(served_model_name="tiny",
                                                                            chat_template=template))
    with BackgroundServer(app) as server:
        yield server.url


def test_a_repeated_bench_is_never_answered_from_the_response_cache(server_url, capsys):
    """The workload is the same every run and greedy: without `Cache-Control: no-store` the second
    run would measure Quill's response cache, not its engine."""
    argv = ["bench", "--url", server_url, "--concurrency", "2", "--num-requests", "2", "--max-tokens", "3",
            "--prompt-words", "4"]
    assert cli.main(argv) == 0 and cli.main(argv) == 0
    metrics = httpx.get(f"{server_url}/metrics").text
    hits = [line for line in metrics.splitlines() if line.startswith("quill:response_cache_hits_total")]
    assert hits and all(float(line.split()[-1]) == 0 for line in hits), hits


def test_bench_reports_a_server_it_cannot_reach_in_one_line(capsys):
    assert cli.main(["bench", "--url", "http://127.0.0.1:9", "--concurrency", "1", "--num-requests", "1"]) == 2
    assert "cannot list the models of http://127.0.0.1:9" in capsys.readouterr().err


def test_bench_against_a_live_server_writes_report_and_plots(server_url, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["bench", "--url", server_url, "--concurrency", "1,3", "--num-requests", "3", "--max-tokens", "5",
            "--prompt-words", "4", "--hourly-cost", "3.6", "--output", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "out tok/s" in printed and "would have cost" in printed and "report.json" in printed
    [run] = json.loads((out / "report.json").read_text())["runs"]
    assert (run["label"], run["model"], run["mode"], run["hourly_cost_usd"]) == ("tiny", "tiny", "concurrency", 3.6)
    assert [level["concurrency"] for level in run["levels"]] == [1, 3]
    for level in run["levels"]:
        assert (level["completed"], level["failed"], level["output_tokens"]) == (3, 0, 15)
        assert level["prompt_tokens"] > 0 and level["output_tokens_per_s"] > 0
        assert level["e2e_s"]["p50"] <= level["e2e_s"]["p99"] and level["duration_s"] > 0
        assert level["cost_per_1m_output_tokens_usd"] == pytest.approx(3.6 * level["duration_s"] / 3600 / 15 * 1e6)
    for name in ("throughput.png", "ttft.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC

    # another run compared with the first one's report: both on one set of plots
    compared = tmp_path / "compared"
    argv = ["bench", "--url", server_url, "--label", "again", "--concurrency", "2", "--num-requests", "2",
            "--max-tokens", "3", "--prompt-words", "0", "--api", "completions",
            "--compare", f"first={out / 'report.json'}", "--output", str(compared)]
    assert cli.main(argv) == 0
    runs = json.loads((compared / "report.json").read_text())["runs"]
    assert [run["label"] for run in runs] == ["again", "first"] and runs[1] == {**run, "label": "first"}
    assert runs[0]["levels"][0]["completed"] == 2 and runs[0]["api"] == "completions"
    assert (compared / "ttft.png").read_bytes()[:8] == PNG_MAGIC
    # a rate sweep cannot share the concurrency axis
    capsys.readouterr()
    assert cli.main(["bench", "--url", server_url, "--rate", "5", "--compare", str(out)]) == 2
    assert "another kind of level" in capsys.readouterr().err


def test_bench_starts_llama_server_with_a_slot_per_request_in_flight_and_measures_it(server_url, tmp_path):
    """--compare-llama-server starts the binary on the GGUF file with one slot per request in flight
    and room for each prompt and answer, measures it under its own label with the same load, and
    stops it. A stand-in binary records its arguments and serves the tiny model with `quill serve`."""
    import sys

    import tiny_models

    model = tiny_models.add_tiny_tokenizer(tiny_models.build_llama(tmp_path / "model"))
    record, binary = tmp_path / "argv.json", tmp_path / "llama-server"
    binary.write_text(f"""#!{sys.executable}
import json, os, sys
json.dump(sys.argv[1:], open({str(record)!r}, "w"))
port = sys.argv[sys.argv.index("--port") + 1]
os.execv({sys.executable!r}, [{sys.executable!r}, "-m", "quill.cli", "serve", {str(model)!r}, "--port", port,
                              "--dtype", "float32"])
""")
    binary.chmod(0o755)
    out = tmp_path / "run"
    argv = ["bench", "--url", server_url, "--concurrency", "1,3", "--num-requests", "3", "--max-tokens", "5",
            "--prompt-words", "4", "--compare-llama-server", str(binary), "--model-file", "m.gguf",
            "--output", str(out)]
    assert cli.main(argv) == 0
    runs = json.loads((out / "report.json").read_text())["runs"]
    assert [run["label"] for run in runs] == ["tiny", "llama-server"]
    assert [level["completed"] for level in runs[1]["levels"]] == [3, 3]
    arguments = json.loads(record.read_text())
    option = dict(zip(arguments[::2], arguments[1::2]))
    assert (option["-m"], option["-np"], option["-t"]) == ("m.gguf", "3", "2")
    assert option["-c"] == str(3 * 1024)  # short prompts: the 1,024 tokens a slot gets at least
    # longer ones get room for ~2 tokens a word, their answer and a margin
    [long_request] = synthetic_workload(1, 600, 128)
    assert long_request.prompt_words > 600
    assert llama_server_slot_context(128, long_request.prompt_words) == 128 + 64 + 2 * long_request.prompt_words
    with pytest.raises(httpx.ConnectError):  # stopped once measured
        httpx.get(f"http://127.0.0.1:{option['--port']}/health")


def test_bench_poisson_rate_sweep(server_url, capsys):
    argv = ["bench", "--url", server_url, "--rate", "20,40", "--num-requests", "3", "--max-tokens", "2",
            "--prompt-words", "0"]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert "rate" in table and "20/s" in table and "40/s" in table and "3/0" in table


def test_bench_reports_failures(server_url, tmp_path, capsys):
    # tiny's context is 256 tokens: these requests are refused, and the run says so
    argv = ["bench", "--url", server_url, "--concurrency", "2", "--num-requests", "2", "--max-tokens", "1000"]
    assert cli.main(argv) == 1
    assert "2 failed, e.g. HTTP 400" in capsys.readouterr().out
    assert httpx.get(f"{server_url}/health").status_code == 200


def test_a_servers_peak_memory_is_read_from_proc_and_none_for_no_such_process():
    import os
    import resource
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("VmHWM is Linux's")
    peak = peak_rss_mb(os.getpid())
    assert peak == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rel=0.05)
    assert peak_rss_mb(2 ** 22 + 12345) is None  # above Linux's largest pid
