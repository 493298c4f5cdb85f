"""The parts of the Ray Serve deployment (quill/deploy) that need no Ray: prefix-affinity routing,
the output wire format, stats across replicas, the settings and the command line, and the server
hooks an engine client uses. The deployment itself runs in test_deploy.py."""
from __future__ import annotations

import pickle
import random
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine_helpers import tiny_engine, tiny_text_engine
from quill.cli import build_parser, main
from quill.cost import CostModel
from quill.deploy.affinity import AffinityTable, InFlight, choose, prefix_hashes
from quill.deploy.settings import ClusterCapacityError, ClusterSettings
from quill.deploy.stats import combine_stats
from quill.deploy.wire import DeltaEncoder, OutputAssembler, merge_deltas
from quill.engine.async_engine import AsyncEngine, EngineClient
from quill.engine.engine import EngineStats
from quill.engine.limits import EngineLimits
from quill.sampling_params import SamplingParams
from quill.server.metrics import ServerMetrics

# ------------------------------------------------------------------------------ routing


def test_prefix_hashes_are_the_engine_prefix_cache_keys(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir("llama"), block_size=16)
    prompt = list(range(3, 43))  # 40 tokens: two full blocks and a partial one
    engine.add_request(prompt, SamplingParams(max_tokens=1))
    while engine.has_unfinished():
        engine.step()
    cached = engine.kv_cache.cached_blocks
    hashes = prefix_hashes(prompt, 16, 64)
    assert len(hashes) == 2 and all(h in cached for h in hashes)
    changed = prompt[:20] + [99] + prompt[21:]  # differs in the second block
    other = prefix_hashes(changed, 16, 64)
    assert other[0] == hashes[0] and other[1] != hashes[1] and other[1] not in cached


def test_prefix_hashes_cover_full_leading_blocks_only():
    assert prefix_hashes(list(range(15)), 16, 64) == ()
    assert len(prefix_hashes(list(range(100)), 16, 64)) == 6
    assert prefix_hashes(list(range(100)), 16, 2) == prefix_hashes(list(range(100)), 16, 64)[:2]


def test_affinity_table_finds_the_live_holders_of_the_longest_known_prefix():
    table = AffinityTable(max_entries=100)
    conversation = prefix_hashes(list(range(64)), 16, 64)  # 4 blocks
    table.record(conversation[:3], "a")
    table.record(conversation[:1], "b")  # another prompt sharing only the first block
    assert table.holders(conversation, {"a", "b"}) == ["a"]  # the longest known prefix
    assert table.holders(conversation[:1], {"a", "b"}) == ["a", "b"]
    assert table.holders(conversation, {"b"}) == ["b"]  # "a" has gone: the next longest prefix
    assert table.holders(prefix_hashes(list(range(100, 164)), 16, 64), {"a", "b"}) == []


def test_affinity_table_evicts_the_longest_prefixes_first():
    table = AffinityTable(max_entries=2)
    hashes = prefix_hashes(list(range(48)), 16, 64)  # 3 blocks
    table.record(hashes, "a")
    assert len(table) == 2
    assert table.holders(hashes[:2], {"a"}) == ["a"]  # the two shortest prefixes are kept
    table.record(hashes[:1], "b")
    assert table.holders(hashes[:1], {"a", "b"}) == ["a", "b"]


def test_choose_sends_a_known_prefix_to_its_holder_until_it_is_overloaded():
    rng = random.Random(0)
    queue = {"a": 6, "b": 2, "c": 1}
    ranks = choose("prefix", ["a", "b", "c"], queue.get, ["a", "b"], max_imbalance=1, rng=rng)
    assert ranks == [["b"], ["c"], ["a"]]  # "a" is 5 above the least loaded: only "b" is preferred
    ranks = choose("prefix", ["a", "b", "c"], queue.get, ["a"], max_imbalance=5, rng=rng)
    assert ranks == [["a"], ["c"], ["b"]]
    ranks = choose("prefix", ["a", "b", "c"], queue.get, ["a"], max_imbalance=4, rng=rng)
    assert ranks == [["c"], ["b"], ["a"]]  # plain least-loaded
    assert choose("prefix", ["a", "b"], {}.get, ["a"], max_imbalance=0, rng=rng)[0] == ["a"]  # unknown: empty


def test_choose_orders_by_load_spreads_ties_and_follows_the_policy():
    firsts = {choose("least-loaded", ["a", "b"], {}.get, [], 4, random.Random(seed))[0][0] for seed in range(40)}
    assert firsts == {"a", "b"}  # equally loaded replicas are not always tried in the same order
    queue = {"a": 3, "b": 0, "c": 1}
    assert choose("least-loaded", ["a", "b", "c"], queue.get, ["a"], 4, random.Random(0)) == [["b"], ["c"], ["a"]]
    random_ranks = choose("random", ["a", "b", "c"], {}.get, ["a"], 4, random.Random(0))
    assert len(random_ranks) == 1 and len(random_ranks[0]) == 1
    assert choose("prefix", [], {}.get, [], 4, random.Random(0)) == []


def test_a_burst_routed_by_in_flight_counts_is_split_evenly():
    """Requests arriving together, each ranked before Ray has confirmed any: the router's own
    reservations spread them one by one (Ray's probed queue lengths would read 0 for all)."""
    in_flight = InFlight()
    for index in range(9):
        replica = choose("least-loaded", ["a", "b", "c"], in_flight.count, [], 4, random.Random(index))[0][0]
        in_flight.reserve(f"r{index}", replica)
    assert [in_flight.count(r) for r in "abc"] == [3, 3, 3]


def test_in_flight_counts_follow_confirmation_and_end_once():
    now = [0.0]
    in_flight = InFlight(hold_s=10.0, clock=lambda: now[0])
    in_flight.reserve("r1", "a")
    in_flight.reserve("r1", "b")  # ranked again (Ray retried): counted once, where it was ranked last
    in_flight.confirm("r1", "c")  # Ray sent it elsewhere (the first choice was full)
    assert [in_flight.count(r) for r in "abc"] == [0, 0, 1]
    in_flight.finished("r1")
    in_flight.finished("r1")
    in_flight.finished("never-sent")
    assert [in_flight.count(r) for r in "abc"] == [0, 0, 0]
    in_flight.reserve("lost", "a")  # cancelled before Ray sent it: never confirmed, never finished
    in_flight.reserve("sent", "a")
    in_flight.confirm("sent", "a")
    now[0] = 11.0
    in_flight.reserve("new", "b")
    assert (in_flight.count("a"), in_flight.count("b")) == (1, 1)  # the lost one expired, the sent one stays


# ------------------------------------------------------------------------------ stats


def _stats(**values) -> EngineStats:
    fields = dict(num_running=0, num_waiting=0, num_kv_blocks=0, num_free_kv_blocks=0, kv_cache_usage=0.0,
                  prefix_cache_queries=0, prefix_cache_hits=0, prefix_cache_hit_rate=0.0, num_prompt_tokens=0,
                  num_generated_tokens=0, num_preemptions=0, prefill_seconds=0.0, decode_seconds=0.0)
    return EngineStats(**{**fields, **values})


def test_combine_stats_sums_counts_and_works_ratios_out_from_the_sums():
    a = _stats(num_running=2, num_waiting=1, num_kv_blocks=100, num_free_kv_blocks=50, kv_cache_usage=0.5,
               prefix_cache_queries=100, prefix_cache_hits=90, prefix_cache_hit_rate=0.9, prefill_seconds=1.0,
               spec_num_drafts=10, spec_num_draft_tokens=40, spec_num_accepted_tokens=20)
    b = _stats(num_running=1, num_waiting=3, num_kv_blocks=300, num_free_kv_blocks=300, prefix_cache_queries=300,
               prefill_seconds=2.0)
    total = combine_stats([a, b])
    assert (total.num_running, total.num_waiting, total.num_kv_blocks, total.prefill_seconds) == (3, 4, 400, 3.0)
    assert total.kv_cache_usage == pytest.approx(50 / 400)  # not the mean of 0.5 and 0.0
    assert total.prefix_cache_hit_rate == pytest.approx(90 / 400)
    assert total.spec_acceptance_rate == pytest.approx(0.5) and total.spec_mean_accepted_length == pytest.approx(3.0)
    empty = combine_stats([])
    assert empty.num_kv_blocks == 0 and empty.kv_cache_usage == 0.0


# ------------------------------------------------------------------------------ the wire


def test_deltas_rebuild_every_engine_output(tiny_model_dir):
    """Replica side: outputs -> deltas (pickled, as Ray sends them); ingress side: deltas -> outputs
    with the same text, tokens and logprobs as the engine's, for several completions at once."""
    engine = tiny_text_engine(tiny_model_dir("llama"))
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=12, logprobs=2, prompt_logprobs=1,
                            ignore_eos=True)
    request_id = engine.add_request("Hello world", params)
    prompt_ids = engine.tokenizer.encode("Hello world")
    encoder, assembler = DeltaEncoder(), OutputAssembler(request_id, prompt_ids)
    finished = 0
    while engine.has_unfinished():
        for output in engine.step():
            rebuilt = assembler.add(pickle.loads(pickle.dumps(encoder.encode(output))))
            assert (rebuilt.index, rebuilt.text, rebuilt.delta) == (output.index, output.text, output.delta)
            assert rebuilt.token_ids == list(output.token_ids) and rebuilt.new_token_ids == output.new_token_ids
            assert rebuilt.logprobs == output.logprobs[:len(output.token_ids)]
            assert rebuilt.prompt_logprobs == output.prompt_logprobs and len(rebuilt.prompt_logprobs) == len(prompt_ids)
            assert (rebuilt.finished, rebuilt.finish_reason) == (output.finished, output.finish_reason)
            assert rebuilt.prompt_token_ids == prompt_ids
            finished += rebuilt.finished
    assert finished == 2


def test_merged_deltas_rebuild_the_same_final_outputs(tiny_model_dir):
    """A replica with stream_interval k sends k outputs at a time, merged per completion: the
    ingress ends with the same text, tokens, logprobs and finish for every completion."""
    engine = tiny_text_engine(tiny_model_dir("llama"))
    params = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=11, logprobs=2, prompt_logprobs=0, ignore_eos=True)
    request_id = engine.add_request("Hello world", params)
    encoder, assembler = DeltaEncoder(), OutputAssembler(request_id, engine.tokenizer.encode("Hello world"))
    final, rebuilt, pending = {}, {}, []
    while engine.has_unfinished():
        for output in engine.step():
            final[output.index] = output
            pending.append(encoder.encode(output))
            if len(pending) == 3:  # outputs of both completions, several steps' worth
                for delta in pickle.loads(pickle.dumps(merge_deltas(pending))):
                    rebuilt[delta.index] = assembler.add(delta)
                pending = []
    for delta in merge_deltas(pending):
        rebuilt[delta.index] = assembler.add(delta)
    assert sorted(rebuilt) == [0, 1]
    for index, output in final.items():
        got = rebuilt[index]
        assert (got.text, got.token_ids, got.logprobs) == (output.text, list(output.token_ids), output.logprobs)
        assert got.prompt_logprobs == output.prompt_logprobs is not None
        assert (got.finished, got.finish_reason) == (True, "length")


# ------------------------------------------------------------------------------ settings and the CLI


def test_settings_refuse_unknown_fields_by_name():
    with pytest.raises(ValueError, match="replicaz"):
        ClusterSettings.model_validate({"model": "m", "replicaz": 2})
    with pytest.raises(ValueError, match="max_queu"):
        ClusterSettings.model_validate({"model": "m", "server": {"max_queu": 3}})
    with pytest.raises(ValueError, match="min_replicas"):
        ClusterSettings.model_validate({"model": "m", "autoscaling": {"min_replicas": 3, "max_replicas": 2}})
    settings = ClusterSettings.model_validate({"model": "m", "server": {"max_queue": 3}, "replicas": 2})
    assert settings.server.max_queue == 3 and settings.deployment_size() == {"num_replicas": 2}
    scaled = ClusterSettings.model_validate({"model": "m", "autoscaling": {"max_replicas": 4}})
    assert scaled.deployment_size() == {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4,
                                                                "target_ongoing_requests": 8.0}}


def test_replicas_must_fit_the_cluster():
    settings = ClusterSettings(model="m", replicas=2, threads_per_replica=2)
    with pytest.raises(ClusterCapacityError, match="need 4 CPUs, but the Ray cluster has 2"):
        settings.check_fits({"CPU": 2.0})
    settings.check_fits({"CPU": 4.0})
    with pytest.raises(ClusterCapacityError, match="GPUs"):
        ClusterSettings(model="m", gpus_per_replica=1).check_fits({"CPU": 2.0})


def test_replica_options_without_replicas_are_refused(capsys):
    assert main(["serve", "m", "--threads-per-replica", "2", "--routing", "random"]) != 0
    assert "--threads-per-replica, --routing only apply to replicas" in capsys.readouterr().err
    assert main(["serve", "m", "--stream-interval", "4"]) != 0
    assert "--stream-interval only apply to replicas" in capsys.readouterr().err
    assert main(["serve", "m", "--replicas", "2", "--max-replicas", "3"]) != 0
    assert "give one of them" in capsys.readouterr().err
    assert main(["serve", "m", "--replicas", "2", "--min-replicas", "1"]) != 0
    assert "need --max-replicas" in capsys.readouterr().err
    assert main(["serve", "m", "--min-replicas", "2"]) != 0
    assert "add --max-replicas N" in capsys.readouterr().err
    assert main(["serve", "m", "--max-replicas", "1", "--min-replicas", "2"]) != 0  # pydantic's rule, in one line
    err = capsys.readouterr().err
    assert err.startswith("error: invalid replica options: ") and err.count("\n") == 1 and "pydantic.dev" not in err


def test_replica_options_become_cluster_settings():
    from quill.cli.serve import cluster_settings
    from quill.server import ServerConfig

    args = build_parser().parse_args(["serve", "m", "--max-replicas", "4", "--min-replicas", "2",
                                      "--threads-per-replica", "2", "--routing", "least-loaded", "--dtype", "float32"])
    settings = cluster_settings(args, ServerConfig(max_queue=7))
    assert settings.autoscaling.min_replicas == 2 and settings.autoscaling.max_replicas == 4
    assert settings.threads_per_replica == 2 and settings.routing.policy == "least-loaded"
    assert settings.engine["dtype"] == "float32" and settings.server.max_queue == 7


def test_the_single_process_server_does_not_import_ray(tiny_model_with_tokenizer):
    """`quill serve` without --replicas, and the settings and routing code, load no Ray (it is an
    optional extra): a fresh interpreter builds the server app and checks sys.modules."""
    script = (
        "import sys\n"
        "from quill.cli import build_parser\n"
        "from quill.cli.serve import replicated\n"
        "from quill.server import ServerConfig, create_app\n"
        "from quill.llm import LLM\n"
        "import quill.deploy, quill.deploy.settings, quill.deploy.affinity\n"
        f"args = build_parser().parse_args(['serve', {str(tiny_model_with_tokenizer('llama', 'spm'))!r}])\n"
        "assert not replicated(args)\n"
        "create_app(LLM(args.model, dtype='float32'), ServerConfig())\n"
        "loaded = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------------ server hooks


def test_only_engine_clients_are_used_as_they_are(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir("llama"))
    assert not isinstance(engine, EngineClient)  # the server wraps an Engine in its own AsyncEngine
    running = AsyncEngine(engine)
    try:
        assert isinstance(running, EngineClient)
    finally:
        running.shutdown()


class _Replicas:
    """Stands in for an engine of several replicas: per-replica stats and their sum."""

    def __init__(self, per_replica: dict[str, EngineStats]) -> None:
        self.per_replica = per_replica

    def stats(self) -> EngineStats:
        return combine_stats(list(self.per_replica.values()))

    def replica_stats(self) -> dict[str, EngineStats]:
        return self.per_replica

    def limits(self) -> EngineLimits:  # replicas are alike: one engine's limits stand for each
        return EngineLimits(max_model_len=256, vocab_size=320, num_kv_blocks=64, block_size=16, dtype="float32")


def _samples(metrics: ServerMetrics, name: str) -> list:
    text = metrics.render()[0].decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def test_metrics_label_each_replica_series_once():
    replicas = _Replicas({"r1": _stats(num_running=2, prefix_cache_hits=5), "r2": _stats(num_running=1)})
    metrics = ServerMetrics(replicas, "m", CostModel())
    running = _samples(metrics, "quill:num_requests_running")
    assert sorted((s.labels["replica"], s.value) for s in running) == [("r1", 2.0), ("r2", 1.0)]
    hits = _samples(metrics, "quill:prefix_cache_hits_total")
    assert sorted((s.labels["replica"], s.value) for s in hits) == [("r1", 5.0), ("r2", 0.0)]
    assert _samples(metrics, "quill:price_per_1k_tokens_dollars")  # the deployment's prices, once
    replicas.per_replica = {}  # none running: no engine series, and the scrape still works
    assert _samples(metrics, "quill:num_requests_running") == []


def test_one_engine_has_no_replica_label(tiny_model_dir):
    running = AsyncEngine(tiny_engine(tiny_model_dir("llama")))
    try:
        samples = _samples(ServerMetrics(running, "m", CostModel()), "quill:num_kv_blocks")
        assert len(samples) == 1 and samples[0].labels == {"model_name": "m"}
    finally:
        running.shutdown()
