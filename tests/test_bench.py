"""The benchmark harness (bench/): pure statistics and workloads, then one real run against the
live deployment, checked for internal consistency rather than speed."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC
from pathlib import Path

import pytest

from bench.__main__ import UsageError, build_parser, config_from_args, main
from bench.records import LoadMode, LoadPoint, RequestRecord, Slo
from bench.stats import Distribution, compare_points, headline, meets_slo, percentile, summarize
from bench.workloads import LengthDist, WorkloadKind, WorkloadParams, build_workload, poisson_arrivals, sample_lengths

# -- stats ------------------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy():
    import numpy as np

    data = [7.0, 1.0, 3.0, 10.0, 2.5, 4.0]
    for q in (0, 25, 50, 90, 99, 100):
        assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)))


def test_percentile_on_known_data():
    data = list(range(1, 101))  # 1..100
    assert percentile(data, 50) == pytest.approx(50.5)
    assert percentile(data, 90) == pytest.approx(90.1)
    assert percentile(data, 99) == pytest.approx(99.01)
    assert percentile([5.0], 99) == 5.0
    assert percentile([], 50) is None


def test_distribution_of_nothing_is_all_none():
    d = Distribution.of([])
    assert (d.count, d.mean, d.p50, d.p90, d.p99) == (0, None, None, None, None)


def _record(target="a", load="c=1", start=0.0, end=1.0, ttft=100.0, tokens=11, ok=True, itl=None):
    return RequestRecord(target=target, load=load, session_id=0, turn=0, max_tokens=tokens, ok=ok,
                         start_s=start, end_s=end, ttft_ms=ttft if ok else None,
                         itl_ms=itl if itl is not None else [90.0] * (tokens - 1),
                         prompt_tokens=20, output_tokens=tokens if ok else 0, usage_reported=ok)


def test_record_derived_latencies():
    r = _record(start=1.0, end=2.0, ttft=100.0, tokens=11)
    assert r.e2e_ms == pytest.approx(1000.0)
    assert r.tpot_ms == pytest.approx(90.0)  # (1000 - 100) / 10
    assert RequestRecord.from_json(json.loads(json.dumps(r.to_json()))) == r
    r.start_s, r.itl_ms = 1.23456789, [0.1234567]
    assert r.to_json()["start_s"] == 1.234568 and r.to_json()["itl_ms"] == [0.123]


def test_summary_counts_rates_and_goodput():
    point = LoadPoint(LoadMode.CLOSED, 2)
    records = [_record(start=0.0, end=1.0, ttft=100.0),                  # meets the SLO
               _record(start=0.0, end=2.0, ttft=600.0),                  # TTFT too slow
               _record(start=1.0, end=1.5, ok=False)]                    # failed
    s = summarize("a", point, records, Slo(ttft_ms=500, itl_ms=200))
    assert (s.num_requests, s.num_ok, s.num_errors) == (3, 2, 1)
    assert s.duration_s == pytest.approx(2.0)
    assert s.output_tokens == 22
    assert s.output_tok_per_s == pytest.approx(11.0)
    assert s.req_per_s == pytest.approx(1.0)
    assert s.num_good == 1 and s.goodput_req_per_s == pytest.approx(0.5)
    assert s.ttft_ms.p50 == pytest.approx(350.0)
    assert s.itl_ms.count == 20
    assert summarize("a", point, records, None).goodput_req_per_s is None


def test_slo_uses_mean_inter_token_time():
    slow_decode = _record(start=0.0, end=3.0, ttft=100.0, tokens=11)  # TPOT 290 ms
    assert not meets_slo(slow_decode, Slo(ttft_ms=500, itl_ms=200))
    assert meets_slo(slow_decode, Slo(ttft_ms=500, itl_ms=300))


def test_headline_against_baseline():
    def at(target, conc, seconds, ttft, gap):
        point = LoadPoint(LoadMode.CLOSED, conc)
        recs = [_record(target=target, load=point.label, end=seconds, ttft=ttft, itl=[gap] * 10)]
        return summarize(target, point, recs, None)

    summaries = [at("ours", 1, 1.0, 30.0, 6.0), at("ours", 4, 0.5, 60.0, 8.0),
                 at("base", 1, 1.0, 20.0, 3.0), at("base", 4, 0.25, 40.0, 4.0)]
    h = headline(summaries, "ours", "base")
    assert h.saturation_tok_per_s == pytest.approx(22.0)
    assert h.baseline_saturation_tok_per_s == pytest.approx(44.0)
    assert h.throughput_ratio == pytest.approx(0.5)
    assert h.low_load == "c=1" and h.saturation_load == "c=4"
    assert h.ttft_p50_diff_ms == pytest.approx(10.0)
    assert h.itl_p50_ratio == pytest.approx(2.0)
    assert [c.load for c in compare_points(summaries, "ours", "base")] == ["c=1", "c=4"]


# -- workloads --------------------------------------------------------------------------------

PARAMS = WorkloadParams(input_len_mean=40, input_len_std=8, output_len_mean=12, output_len_std=3)


@pytest.mark.parametrize("kind", list(WorkloadKind))
def test_workloads_are_seeded(kind):
    first = build_workload(kind, PARAMS, 10, seed=1)
    assert first == build_workload(kind, PARAMS, 10, seed=1)
    assert first != build_workload(kind, PARAMS, 10, seed=2)
    assert first != build_workload(kind, PARAMS, 10, seed=1, variant=1)
    assert sum(s.num_requests for s in first) == 10


def test_synthetic_lengths_and_vocab():
    sessions = build_workload(WorkloadKind.SYNTHETIC, PARAMS, 200, seed=3)
    ids = [i for s in sessions for i in s.turns[0].prompt_ids]
    assert min(ids) >= PARAMS.vocab_min and max(ids) < PARAMS.vocab_max
    lengths = [len(s.turns[0].prompt_ids) for s in sessions]
    assert abs(sum(lengths) / len(lengths) - 40) < 3
    assert all(not s.is_chat and s.num_requests == 1 for s in sessions)


def test_uniform_lengths_have_the_asked_mean_and_spread():
    lengths = sample_lengths(random.Random(0), 100, 10, LengthDist.UNIFORM, 5000)
    half = 10 * math.sqrt(3)
    assert min(lengths) >= round(100 - half) and max(lengths) <= round(100 + half)
    assert abs(sum(lengths) / len(lengths) - 100) < 1
    assert sample_lengths(random.Random(0), 2, 50, LengthDist.NORMAL, 500)[0] >= 1


def test_mixed_is_half_long_half_short():
    p = WorkloadParams(long_input_len=300, long_output_len=4, short_input_len=8, short_output_len=50)
    sessions = build_workload(WorkloadKind.MIXED, p, 11, seed=0)
    shapes = [(len(s.turns[0].prompt_ids), s.turns[0].max_tokens) for s in sessions]
    assert shapes.count((300, 4)) == 5 and shapes.count((8, 50)) == 6
    assert shapes[:5] != [(300, 4)] * 5 or shapes[5:] != [(8, 50)] * 6  # shuffled, not blocked


def test_multiturn_shares_system_prompts():
    p = WorkloadParams(turns_per_session=3, num_system_prompts=2, system_prompt_words=20, user_turn_words=5)
    sessions = build_workload(WorkloadKind.MULTITURN, p, 10, seed=0)
    assert [s.num_requests for s in sessions] == [3, 3, 3, 1]
    assert len({s.system_text for s in sessions}) == 2
    assert all(s.is_chat and len(s.system_text.split()) == 20 for s in sessions)
    assert all(len(t.user_text.split()) == 5 for s in sessions for t in s.turns)


def test_poisson_arrivals_are_seeded_and_have_the_rate():
    times = poisson_arrivals(4.0, 2000, seed=0)
    assert times == poisson_arrivals(4.0, 2000, seed=0) and times != poisson_arrivals(4.0, 2000, seed=1)
    assert times[0] == 0 and all(b >= a for a, b in zip(times, times[1:]))
    assert abs(len(times) / times[-1] - 4.0) < 0.4


# -- the CLI ------------------------------------------------------------------------------------


def _config(*argv):
    return config_from_args(build_parser().parse_args(["run", "--out", "x", *argv]))


def test_cli_targets_defaults_and_errors():
    c = _config("--target", "agg=http://h:1/v1", "--target", "vllm=http://h:2/v1/", "--baseline", "vllm",
                "--mode", "open", "--rate", "8,2", "--input-len-mean", "7", "--length-dist", "uniform")
    assert [(t.label, t.base_url) for t in c.targets] == [("agg", "http://h:1/v1"), ("vllm", "http://h:2/v1")]
    assert c.load_values == (2.0, 8.0) and c.mode is LoadMode.OPEN
    assert c.params.input_len_mean == 7 and c.params.length_dist is LengthDist.UNIFORM
    assert c.options.num_requests == 32 and c.slo is None
    single = _config("--url", "http://h:1/v1", "--label", "agg", "--slo-ttft-ms", "500", "--slo-itl-ms", "50")
    assert single.targets[0].label == "agg" and single.slo == Slo(500, 50)
    for bad in (["--url", "u", "--baseline", "nope"], ["--target", "nolabel"], ["--url", "u", "--concurrency", "0"],
                ["--url", "u", "--slo-ttft-ms", "5"], []):
        with pytest.raises(UsageError):
            _config(*bad)


# -- against the live deployment ------------------------------------------------------------------


def _api_key(deployment) -> str:
    return deployment.settings.frontend.api_key or "none"


@pytest.mark.integration
def test_harness_against_live_deployment(deployment, tmp_path):
    out = tmp_path / "run"
    argv = ["run", "--target", f"agg={deployment.base_url}", "--target", f"again={deployment.base_url}",
            "--baseline", "again", "--model", deployment.settings.model.name, "--workload", "synthetic",
            "--mode", "closed", "--concurrency", "1,4", "--num-requests", "8", "--seed", "5",
            "--input-len-mean", "24", "--input-len-std", "6", "--output-len-mean", "8", "--output-len-std", "2",
            "--slo-ttft-ms", "100000", "--slo-itl-ms", "100000", "--request-timeout-s", "60",
            "--deadline-s", "240", "--warmup-sessions", "1", "--api-key", _api_key(deployment), "--out", str(out)]
    assert main(argv) == 0
    for name in ("results.json", "report.md", "ttft_cdf.png", "itl_cdf.png", "throughput.png"):
        assert (out / name).stat().st_size > 0, name
    body = json.loads((out / "results.json").read_text())
    records = body["records"]
    assert len(records) == 2 * 2 * 8  # targets x load points x requests
    assert all(r["ok"] for r in records), [r["error"] for r in records if not r["ok"]]
    for r in records:
        assert r["usage_reported"] and r["output_tokens"] == r["max_tokens"]
        assert 0 <= r["ttft_ms"] <= r["e2e_ms"]
        assert r["start_s"] <= r["end_s"]
        assert len(r["itl_ms"]) == r["num_chunks"] - 1 and all(g >= 0 for g in r["itl_ms"])
        assert r["prompt_tokens"] > 0
    assert len(body["summaries"]) == 4
    for s in body["summaries"]:
        mine = [r for r in records if r["target"] == s["target"] and r["load"] == s["load"]]
        assert s["num_requests"] == s["num_ok"] == len(mine) == 8
        assert s["output_tokens"] == sum(r["output_tokens"] for r in mine)
        assert s["prompt_tokens"] == sum(r["prompt_tokens"] for r in mine)
        assert s["ttft_ms"]["count"] == 8 and s["e2e_ms"]["count"] == 8
        assert s["itl_ms"]["count"] == sum(len(r["itl_ms"]) for r in mine)
        assert s["num_good"] == 8
        assert s["output_tok_per_s"] == pytest.approx(s["output_tokens"] / s["duration_s"])
        assert s["ttft_ms"]["p50"] <= s["ttft_ms"]["p99"] <= max(r["e2e_ms"] for r in mine)
    # The same requests went to both targets, so their token totals match point by point.
    by_key = {(s["target"], s["load"]): s for s in body["summaries"]}
    for load in ("c=1", "c=4"):
        assert by_key[("agg", load)]["output_tokens"] == by_key[("again", load)]["output_tokens"]
    assert [h["target"] for h in body["headlines"]] == ["agg"]
    report = (out / "report.md").read_text()
    assert "## Target `agg`" in report and "## Against the baseline `again`" in report
    assert "| c=4 | 8/8 |" in report and "All requests succeeded." in report


@pytest.mark.integration
@pytest.mark.parametrize("client", ["http", "openai"])
def test_multiturn_open_loop_against_live_deployment(deployment, tmp_path, client):
    """The chat path and the open loop: each turn carries the conversation so far."""
    out = tmp_path / "multiturn"
    argv = ["run", "--client", client, "--url", deployment.base_url, "--label", "agg",
            "--model", deployment.settings.model.name,
            "--workload", "multiturn", "--mode", "open", "--rate", "4", "--num-requests", "6",
            "--turns-per-session", "2", "--system-prompt-words", "40", "--user-turn-words", "6",
            "--output-len-mean", "6", "--warmup-sessions", "0", "--deadline-s", "180",
            "--api-key", _api_key(deployment), "--out", str(out)]
    assert main(argv) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert len(records) == 6 and all(r["ok"] for r in records), [r["error"] for r in records]
    assert all(r["output_tokens"] == r["max_tokens"] and r["ttft_ms"] <= r["e2e_ms"] for r in records)
    first = {r["session_id"]: r for r in records if r["turn"] == 0}
    second = [r for r in records if r["turn"] == 1]
    assert len(second) == 3
    for r in second:  # sent after turn 0 finished, with turn 0's question and answer in the prompt
        assert r["start_s"] >= first[r["session_id"]]["end_s"]
        assert r["prompt_tokens"] > first[r["session_id"]]["prompt_tokens"]


# -- scenarios: pure parts (no servers) ---------------------------------------------------------------


def test_stream_timing_keeps_output_chunks_and_usage():
    from bench.client import StreamTiming

    chat = StreamTiming(sent=0.0)
    chat.take(1.0, {"choices": [{"delta": {"role": "assistant", "content": ""}}]}, chat=True)  # role only
    chat.take(2.0, {"choices": [{"delta": {"content": "Hi"}}]}, chat=True)
    chat.take(3.0, {"choices": [{"delta": {}, "finish_reason": "length"}]}, chat=True)
    chat.take(4.0, {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2,
                                             "prompt_tokens_details": {"cached_tokens": 4}}}, chat=True)
    assert chat.chunk_times == [2.0, 3.0] and chat.text == "Hi"
    assert (chat.prompt_tokens, chat.output_tokens, chat.cached_tokens) == (7, 2, 4)
    plain = StreamTiming(sent=0.0)
    plain.take(1.0, {"choices": [{"text": "a"}]}, chat=False)
    plain.take(2.0, {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}, chat=False)
    assert plain.chunk_times == [1.0] and plain.text == "a" and plain.cached_tokens == 0


def _lease(worker="decode0@h", queries=0, hits=0, pid=1, started=100.0, role="decode"):
    from tasks.registry import WorkerStatus

    return WorkerStatus(worker_id=worker, role=role, queues=[role], hostname="h", pid=pid, started_unix=started,
                        updated_unix=started + 1, prefix_cache_queries=queries, prefix_cache_hits=hits)


def test_engine_hit_rate_is_the_delta_between_two_lease_snapshots():
    from bench.cache_stats import CacheCounters, engine_deltas, total

    before = [_lease("a", 1000, 400), _lease("b", 500, 100), _lease("r", 9, 9, role="router")]
    after = [_lease("a", 1600, 850), _lease("b", 900, 300), _lease("r", 99, 99, role="router"),
             _lease("c", 200, 50)]  # c joined in between: counts from zero
    deltas = engine_deltas(before, after)
    assert deltas == {"a": CacheCounters(600, 450), "b": CacheCounters(400, 200), "c": CacheCounters(200, 50)}
    assert total(deltas) == CacheCounters(1200, 700)
    assert total(deltas).hit_rate == pytest.approx(700 / 1200)
    assert CacheCounters().hit_rate is None and total({}) == CacheCounters()


def test_a_restarted_worker_counts_from_zero():
    from bench.cache_stats import CacheCounters, engine_deltas

    before = [_lease("a", 1000, 400, pid=1), _lease("b", 1000, 400)]
    after = [_lease("a", 300, 100, pid=2), _lease("b", 100, 50)]  # a: new pid; b: counters went down
    assert engine_deltas(before, after) == {"a": CacheCounters(300, 100), "b": CacheCounters(100, 50)}


def test_router_counters_delta_and_rate():
    from bench.cache_stats import RouterCounters

    delta = RouterCounters(130, 200) - RouterCounters(30, 100)
    assert delta == RouterCounters(100, 100) and delta.hit_rate == 1.0
    assert RouterCounters().hit_rate is None


def test_vs_vllm_verdicts_against_the_targets():
    from dataclasses import replace

    from bench.stats import Headline
    from bench.vs_vllm import verdicts

    head = Headline("agg", "vllm", 950.0, 1000.0, 0.95, "c=1", 6.0, 1.125, 1.15)
    checks = {v.name.split(",")[0]: v for v in verdicts(head, baseline_itl_p50_ms=4.0)}
    assert checks["throughput at saturation"].met is True  # 0.95 >= 0.95
    ttft = next(v for v in checks.values() if v.name.startswith("TTFT"))
    assert ttft.value == 6.0 and ttft.met is False  # over +5 ms
    itl_ms = [v for v in verdicts(head, 4.0) if v.name.endswith("(ms)") and v.name.startswith("ITL")][0]
    assert itl_ms.value == pytest.approx(0.5) and itl_ms.met is True  # 1.125 x 4 ms = +0.5 ms
    tpot = [v for v in verdicts(head, 4.0, 5.0) if v.name.startswith("TPOT")][0]
    assert tpot.value == pytest.approx(0.75) and tpot.met is False  # 1.15 x 5 ms = +0.75 ms
    at_c1 = {v.name: v for v in verdicts(replace(head, saturation_load="c=1"), 4.0, 4.0)}
    assert at_c1["throughput at saturation, ours / vLLM"].met is None  # one stream saturates nothing
    missing = verdicts(Headline("agg", "vllm", 1.0, 0.0, None, "", None, None, None), None)
    assert all(v.met is None for v in missing)


def test_vs_vllm_rounds_report_every_round_and_the_median():
    from dataclasses import asdict

    from bench.stats import Headline
    from bench.vs_vllm import VsVllmSpec, round_medians, rounds_markdown, verdicts

    def one_round(ratio, servers):
        head = Headline("agg", "vllm", 900.0 * ratio, 900.0, ratio, "c=1", 2.0, 1.0, 1.0)
        return {"spec": {"servers": servers}, "machine_start": {"load_1m": 1.5},
                "verdicts": {"agg": [asdict(v) for v in verdicts(head, None)]}}

    rounds = [one_round(0.7, "agg,vllm"), one_round(1.1, "vllm,agg"), one_round(0.8, "agg,vllm")]
    medians = round_medians(rounds)["agg"]
    assert medians["throughput at saturation, ours / vLLM"] == pytest.approx(0.8)
    assert medians["ITL p50 at c=1, ours - vLLM (ms)"] is None  # no baseline ITL in any round
    text = rounds_markdown(VsVllmSpec(rounds=3), {"rounds": [{"servers": r["spec"]["servers"], **r} for r in rounds],
                                                   "medians": {"agg": medians}})
    assert "round 2 (vllm,agg; load 1.5)" in text and "**0.80**" in text


def test_collapsed_stacks_summaries():
    from bench.profiling import by_package, inclusive_time, parse_collapsed, self_time

    text = "\n".join([
        "process 12:\"python x\";thread (0x1);run (app/routes.py);loads (json/decoder.py) 6",
        "run (app/routes.py);xread (redis/commands/core.py) 3",
        "step (vllm/v1/engine/core.py);forward (torch/nn/modules/module.py) 1",
        "garbage line", ""])
    stacks = parse_collapsed(text)
    assert len(stacks) == 3 and sum(c for _, c in stacks) == 10
    assert stacks[0][0][0].func == "run" and stacks[0][0][-1].file == "json/decoder.py"
    top = self_time(stacks)
    assert (top[0].name, top[0].samples, top[0].percent) == ("loads (json/decoder.py)", 6, 60.0)
    incl = {s.name: s.percent for s in inclusive_time(stacks)}
    assert incl["run (app/routes.py)"] == 90.0 and incl["step (vllm/v1/engine/core.py)"] == 10.0
    assert {s.name: s.samples for s in by_package(stacks)} == {"json": 6, "redis": 3, "torch": 1}
    native = parse_collapsed(" 4\nthread (0x2); 1")  # samples of threads with no Python frame
    assert [(frames[0].func, c) for frames, c in native] == [("(no Python frame)", 4), ("(no Python frame)", 1)]


def test_frame_package_from_site_packages_path():
    from bench.profiling import parse_frame

    assert parse_frame("f (/x/lib/python3.11/site-packages/kombu/utils.py)").package == "kombu"
    assert parse_frame("main (bench.py)").package == "bench"
    assert parse_frame("<module> (workers/runtime.py)").package == "workers"


def test_deploy_helpers(tmp_path):
    from bench.deploy import redis_url_for, trim_log, vllm_server_args
    from config import load_settings

    assert redis_url_for(3) == "redis://127.0.0.1:6379/3"
    for db in (0, 8, 15):
        with pytest.raises(ValueError):
            redis_url_for(db)
    root = Path(__file__).resolve().parent.parent
    settings = load_settings(root / "configs" / "agg.yaml", ["engine.kv_cache_gib=0.25"], environ={})
    args = vllm_server_args(settings)
    flag = lambda name: args[args.index(name) + 1]  # noqa: E731
    assert flag("--block-size") == "32" and flag("--kv-cache-memory-bytes") == str(2**28)
    assert flag("--max-num-seqs") == str(settings.engine.max_num_seqs) and "--enforce-eager" in args
    assert flag("--served-model-name") == settings.model.name
    log = tmp_path / "x.log"
    log.write_bytes(b"a" * 1000 + b"b" * 1000)
    trim_log(log, max_bytes=400)
    data = log.read_bytes()
    assert data.startswith(b"a" * 100) and data.endswith(b"b" * 300) and b"cut" in data and len(data) < 500


def test_router_speed_cache_model_is_seeded_and_indexes_every_block():
    from bench.router_speed import (
        RouterSpeedSpec,
        apply_remove,
        apply_store,
        apply_wire,
        build_cache_model,
        make_prompts,
        one_block_each,
        removal_events,
    )
    from router.index import RadixIndex

    spec = RouterSpeedSpec(num_blocks=600, num_workers=3, num_trunks=5, trunk_blocks=4, branch_blocks_max=6)
    model = build_cache_model(spec)
    assert model.events == build_cache_model(spec).events
    index = RadixIndex(spec.block_size)
    rate = apply_store(index, model.events)
    assert index.num_blocks >= 600 and rate.num_blocks == sum(len(e.block_hashes) for e in model.events)
    split = RadixIndex(spec.block_size)
    apply_store(split, one_block_each(model.events))
    assert split.blocks_per_worker() == index.blocks_per_worker()  # the same blocks, one event each
    assert apply_wire(model.events, spec.block_size).num_blocks == rate.num_blocks
    prompts = make_prompts(model, spec, 256, 40)
    assert all(len(p) == 256 for p in prompts)
    assert sum(bool(index.overlaps(p)) for p in prompts) >= 25  # three quarters share a cached prefix
    removed = apply_remove(index, removal_events(index, random.Random(0), n=10**6))
    assert removed.num_blocks == rate.num_blocks and index.num_blocks == 0


def test_scenario_subcommands_parse():
    args = build_parser().parse_args(["kv-routing", "--out", "x", "--concurrency", "2", "--num-system-prompts", "3"])
    from bench.kv_routing import KvRoutingSpec

    spec = KvRoutingSpec(concurrency=args.concurrency, num_system_prompts=args.num_system_prompts)
    assert spec.concurrencies == (2,)
    workload = spec.workload(2, seed=5)
    assert workload.options.seed == 5 and workload.options.warmup_sessions == 0
    assert workload.params.num_system_prompts == 3 and workload.kind is WorkloadKind.MULTITURN
    for name in ("vs-vllm", "profile", "router-speed", "first-burst", "migration"):
        assert build_parser().parse_args([name, "--out", "x"]).command == name


def test_results_go_to_an_ignored_folder_unless_out_is_given():
    from datetime import datetime

    from bench.output import OUT_ROOT, default_out

    assert build_parser().parse_args(["router-speed"]).out is None  # main() fills in the default
    assert build_parser().parse_args(["router-speed", "--out", "x"]).out == Path("x")
    at = datetime(2026, 12, 3, 18, 5, 9, tzinfo=UTC)
    assert default_out("vs-vllm", at) == OUT_ROOT / "vs-vllm-20261203T180509Z"
    assert OUT_ROOT == Path(__file__).resolve().parent.parent / "bench" / "out"
    ignored = (OUT_ROOT.parent.parent / ".gitignore").read_text().split()
    assert "bench/out/" in ignored


def test_merge_runs_of_different_servers():
    from bench.records import Target
    from bench.runner import RunConfig, RunOptions, RunResult
    from bench.scenario import merge

    def one(label):
        config = RunConfig((Target(label, "u", "m"),), WorkloadKind.SYNTHETIC, PARAMS, LoadMode.CLOSED, (1.0,),
                           RunOptions())
        return RunResult(config, [_record(target=label)], "t", 2.0)

    merged = merge([one("a"), one("b")], baseline="b")
    assert [t.label for t in merged.config.targets] == ["a", "b"] and merged.config.baseline == "b"
    assert [r.target for r in merged.records] == ["a", "b"] and merged.wall_s == 4.0


def test_cached_share_by_conversation_turn():
    from bench.kv_routing import TurnShare, hit_rate_by_turn

    def rec(turn, prompt, cached, ok=True):
        r = _record(ok=ok)
        r.turn, r.prompt_tokens, r.cached_tokens = turn, prompt, cached
        return r

    shares = hit_rate_by_turn([rec(0, 100, 0), rec(0, 100, 50), rec(1, 300, 270), rec(1, 999, 999, ok=False)])
    assert shares == {0: TurnShare(2, 200, 50), 1: TurnShare(1, 300, 270)}
    assert shares[0].cached_share == 0.25 and shares[1].prompt_tokens_per_request == 300
    assert TurnShare(0, 0, 0).cached_share is None



def test_aiperf_export_figures_and_medians():
    from bench.aiperf_check import ToolFigures, agreement, aiperf_figures, medians, tool_order
    from bench.scenario import MachineState

    machine = MachineState("t", 1.0, 1.0, 1.0, 2, "")
    export = {"time_to_first_token": {"unit": "ms", "p50": 40.0, "p99": 90.0},
              "inter_token_latency": {"unit": "ms", "p50": 5.0},
              "output_token_throughput": {"unit": "tokens/sec", "avg": 440.0},
              "request_count": {"unit": "requests", "avg": 64}}
    f = aiperf_figures(export, machine)
    assert (f.ttft_p50_ms, f.ttft_p99_ms, f.itl_p50_ms) == (40.0, 90.0, 5.0)
    assert (f.output_tok_per_s, f.num_requests) == (440.0, 64)
    assert aiperf_figures({}, machine).ttft_p50_ms is None
    assert tool_order(2) == ["aiperf", "harness", "aiperf", "harness", "aiperf"]
    runs = [f, ToolFigures("harness-2", 50.0, None, None, 400.0, 64, machine),
            ToolFigures("aiperf-3", 60.0, None, None, 420.0, 64, machine)]
    assert medians(runs) == [("TTFT p50 ms", 50.0, 50.0), ("output tok/s", 430.0, 400.0)]
    assert agreement(400.0, 430.0) == pytest.approx(0.075) and agreement(None, 1.0) is None


def test_aiperf_is_paced_and_does_not_scrape_unless_asked():
    import argparse

    from bench.aiperf_check import AiperfCheckSpec, aiperf_argv
    from bench.flags import add_dataclass_flags, from_flags

    def flags(*argv):
        parser = argparse.ArgumentParser()
        add_dataclass_flags(parser, AiperfCheckSpec, "t")
        return from_flags(AiperfCheckSpec, parser.parse_args(list(argv)))

    def argv(spec):
        args = aiperf_argv(spec, "http://h:1", "tok", Path("d"))
        return args, (args[args.index("--request-rate") + 1] if "--request-rate" in args else None)

    args, rate = argv(flags())
    assert rate == "200" and "constant" in args and "--no-server-metrics" in args
    args, rate = argv(flags("--pacing-per-s", "0", "--scrape-metrics"))
    assert rate is None and "--no-server-metrics" not in args
    assert flags("--no-scrape-metrics").scrape_metrics is False


def test_ttft_split_into_stages_from_stream_entry_ids():
    from bench.stages import Sent, entry_seconds, parse_stage_header, stage_times, summarize_stages

    assert entry_seconds(b"1700000000123-4") == 1700000000.123
    sent = Sent("r", sent=100.000, first_chunk=100.050, end=100.400)
    events = [(100.010, "routed"), (100.020, "accepted"), (100.045, "delta"), (100.300, "delta"),
              (100.390, "delta"), (100.391, "finished")]
    t = {k: (round(v, 3) if v is not None else None) for k, v in stage_times(sent, events).items()}
    assert {k: v for k, v in t.items() if v is not None} == {
        "dispatch": 20.0, "router_hop": 10.0, "engine_first": 25.0, "delivery_first": 5.0, "ttft": 50.0,
        "decode": 345.0, "delivery_last": 9.0}
    lost = stage_times(Sent("r", 100.0, None, None), [(100.02, "accepted")])
    assert lost["dispatch"] == pytest.approx(20.0) and lost["router_hop"] is None and lost["ttft"] is None
    summary = summarize_stages([t, lost])
    assert summary["dispatch"].count == 2 and summary["router_hop"].count == 1
    # The frontend's own marks (X-Stage-Times) split dispatch and delivery further.
    marks = parse_stage_header("recv=100.001,parsed=100.002,tokenized=100.0025,published=100.004,first=100.047")
    split = stage_times(Sent("r", 100.000, 100.050, 100.400, marks), events)
    assert {k: round(split[k], 3) for k in ("http_in", "parse", "tokenize", "publish", "queue_pickup",
                                           "frontend_read", "sse_write")} == \
        {"http_in": 1.0, "parse": 1.0, "tokenize": 0.5, "publish": 1.5, "queue_pickup": 16.0, "frontend_read": 2.0,
         "sse_write": 3.0}
    assert t["http_in"] is None and parse_stage_header(None) == {}


def test_a_remote_prefill_split_into_stages_from_every_process_log():
    from datetime import datetime

    from bench.remote_prefill import (
        DISAGG_STAGES,
        Timeline,
        decode_step_ms,
        marks_from_log,
        stage_ms,
        stamp,
        traces_from_log,
    )

    base = datetime(2026, 12, 4, 15, 0, 0).timestamp()  # local time, as every process logs
    log = [  # one line in each clock's format: the frontend's, Celery's, vLLM's engine (ours)
        "[frontend] 2026-12-04 15:00:00,010 INFO app.gateway: [rp-1] enqueued 1 task(s), 2048 prompt tokens",
        "[decode0] [2026-12-04 15:00:00,023: INFO/MainProcess] [rp-1] remote prefill of 2048 tokens requested",
        "[prefill0] [2026-12-04 15:00:00,025: INFO/MainProcess] [rp-1] prefill claimed for decode0@vm (1 listener)",
        "[prefill0] VLLM INFO 2026-12-04 15:00:00.100 [nixl_agents.py:1] [rp-1-ab12cd34] writing the KV to d-1",
        "[prefill0] VLLM DEBUG 2026-12-04 15:00:00.101 [nixl_agents.py:1] [rp-1-ab12cd34] WRITE posted: transfer() "
        "0.412 ms, returned DONE, 3 minor faults; with its preparation 0.650 ms",
        "[decode0] VLLM DEBUG 2026-12-04 15:00:00.104 [nixl_agents.py:1] [rp-1-ef56ab78:1] notification drained",
        "[decode0] VLLM INFO 2026-12-04 15:00:00.108 [nixl_agents.py:1] [rp-1-ef56ab78] push received",
        "[prefill0] VLLM DEBUG 2026-12-04 15:00:00.109 [nixl_agents.py:1] [rp-1-ab12cd34] WRITE reported done: "
        "NIXL 0.686 ms (post 0.686 ms), 4 descriptors",
        "[decode0] VLLM DEBUG 2026-12-04 15:00:00.115 [nixl_agents.py:1] [rp-1-ef56ab78] step after the push: "
        "3.66 ms before it, forward 3.68 ms, connector 0.06 ms",
        "[decode0] VLLM INFO 2026-12-04 15:00:00.109 [nixl_agents.py:1] [rp-2-ef56ab78] push received",
        "[decode0] [2026-12-04 15:00:00,500: INFO/MainProcess] [rp-1] remote prefill of 2048 tokens requested",
    ]
    assert stamp(log[0]) == pytest.approx(base + 0.010) and stamp("no time here") is None
    marks = marks_from_log(log, ["rp-1"])["rp-1"]  # the first time each mark is seen; rp-2 is not asked for
    assert {k: round((v - base) * 1000) for k, v in marks.items()} == {
        "enqueued": 10, "requested": 23, "claimed": 25, "write_started": 100, "write_posted": 101, "notif_drained": 104,
        "received": 108, "write_done": 109}
    assert traces_from_log(log, ["rp-1"])["rp-1"] == {"ms": [0.686], "post": [0.686], "descs": [4.0],
                                                       "before": [3.66], "forward": [3.68], "post_ms": [0.412],
                                                       "done": [1.0], "faults": [3.0], "prep_ms": [0.65]}
    t = Timeline("disagg", "rp-1", sent=base, first_chunk=base + 0.130,
                 marks={**marks, "accepted": base + 0.020, "first_delta": base + 0.125, "last_delta": base + 0.249})
    ms = {k: round(v, 3) for k, v in stage_ms([t], DISAGG_STAGES).items() if v is not None}
    assert ms["prefill engine: queue, compute, to its WRITE"] == 75.0
    assert ms["WRITE, notify, decode engine receives"] == 8.0 and ms["TTFT"] == 130.0
    assert ms["  WRITE starts -> D's writer thread drains its notification"] == 4.0
    assert "claim reaches the decode worker" not in ms  # no claim_seen mark: no figure, not a zero
    assert decode_step_ms(t, 32) == pytest.approx(4.0)


def test_first_burst_growth_by_process_kind_and_the_report():
    import os

    from bench.first_burst import FirstBurstSpec, ProcessUse, by_name, growth, markdown, process_uses

    me = process_uses([os.getpid(), 999_999_999])  # the second pid does not exist
    assert list(me) == [os.getpid()] and me[os.getpid()].minor_faults > 0 and me[os.getpid()].private_mb > 0
    before = {1: ProcessUse("w", 100, 10.0), 2: ProcessUse("w", 50, 5.0), 3: ProcessUse("gone", 1, 1.0)}
    after = {1: ProcessUse("w", 150, 12.5), 2: ProcessUse("w", 60, 5.0), 4: ProcessUse("new", 9, 9.0)}
    grew = growth(before, after)
    assert [(g["pid"], g["minor_faults"], g["private_mb"]) for g in grew] == [(1, 50, 2.5), (2, 10, 0.0)]
    assert by_name(grew) == {"w": (2, 60, 2.5)}

    def burst(ttft, dispatch):
        return {"burst": 0, "num_failed": 0, "ttft": {"p50": ttft}, "dispatch": {"p50": dispatch},
                "engine_first": {"p50": None if dispatch is None else 10.0}}

    runs = [{"variant": v, "round": r, "bursts": [burst(t, d)], "first_burst_growth": grew if d else []}
            for v, r, t, d in [("as-configured", 1, 150.0, 100.0), ("off", 1, 900.0, 850.0),
                               ("as-configured", 2, 170.0, 120.0), ("off", 2, 1100.0, 1000.0),
                               ("vllm serve", 1, 140.0, None), ("vllm serve", 2, 160.0, None)]]
    machine = {"at": "t", "load_1m": 1.0, "load_5m": 1.0, "load_15m": 1.0}
    text = markdown(FirstBurstSpec(bursts=1), {"machine_start": machine, "runs": runs})
    assert "| off | 2 | 1,100 (1,000, 10) |" in text and "| vllm serve | 1 | 140 (–, –) |" in text
    assert "as-configured 160 ms; off 1,000 ms; vllm serve 150 ms." in text
    assert "| w (x2) |" in text and "| 60, 2.5 |" in text


def test_occupancy_counts_requests_between_first_token_and_end():
    from bench.occupancy import occupancy

    def rec(target, start, ttft_ms, end):
        return {"target": target, "load": "c=2", "ok": True, "start_s": start, "ttft_ms": ttft_ms, "end_s": end}

    # "full": two requests stream over the whole run; "gappy": the second starts streaming only
    # halfway through, so over the middle of the run one streams, then two.
    records = [rec("full", 0.0, 0.0, 10.0), rec("full", 0.0, 0.0, 10.0),
               rec("gappy", 0.0, 0.0, 10.0), rec("gappy", 0.0, 5000.0, 10.0),
               {"target": "full", "load": "c=2", "ok": False, "start_s": 0.0, "ttft_ms": None, "end_s": 1.0}]
    by_target = {o.target: o for o in occupancy(records)}
    assert by_target["full"].mean_streaming == pytest.approx(2.0)
    assert by_target["full"].share_under_half == 0
    assert by_target["gappy"].mean_streaming == pytest.approx(1.5, abs=0.01)
    assert by_target["gappy"].peak == 2
