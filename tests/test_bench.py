"""The benchmark harness (bench/): pure statistics and workloads, then one real run against the
live deployment, checked for internal consistency rather than speed."""

from __future__ import annotations

import json
import math
import random

import pytest

from bench.__main__ import UsageError, build_parser, config_from_args, main
from bench.records import LoadMode, LoadPoint, RequestRecord, Slo
from bench.stats import Distribution, compare_points, headline, meets_slo, percentile, summarize
from bench.workloads import (LengthDist, WorkloadKind, WorkloadParams, build_workload, poisson_arrivals,
                             sample_lengths)

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
    assert h.low_load == "c=1"
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
def test_multiturn_open_loop_against_live_deployment(deployment, tmp_path):
    """The chat path and the open loop: each turn carries the conversation so far."""
    out = tmp_path / "multiturn"
    argv = ["run", "--url", deployment.base_url, "--label", "agg", "--model", deployment.settings.model.name,
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
