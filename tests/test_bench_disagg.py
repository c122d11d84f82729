"""Unit tests for bench/disagg.py and bench/nixl_bandwidth.py's pure parts, and where bench/disagg.py runs
its load generator: no engines, no NIXL."""

from __future__ import annotations

import os
import subprocess
from dataclasses import asdict

import pytest

from bench import disagg
from bench.disagg import (
    DisaggSpec,
    Goal,
    PointResult,
    TransferCounters,
    chunk_times_s,
    long_sessions,
    ratio,
    transfer_delta,
    transfer_vs_raw,
    window_stats,
)
from bench.nixl_bandwidth import KIB, MIB, Case, default_cases, kv_block_bytes, summarize
from bench.records import RequestRecord
from conftest import wait_for
from tasks.registry import WorkerStatus


def lease(worker="decode0", pid=10, started=1.0, nbytes=0, seconds=0.0, remote=0, fallbacks=0) -> WorkerStatus:
    return WorkerStatus(worker, "decode", ["decode"], "host", pid, started, started + 5,
                        kv_transfer_bytes=nbytes, kv_transfer_seconds=seconds, num_remote_prefills=remote,
                        num_local_fallbacks=fallbacks)


def test_transfer_delta_is_after_minus_before():
    before = [lease(nbytes=1_000, seconds=0.5, remote=2, fallbacks=1)]
    after = [lease(nbytes=5_000_000, seconds=0.75, remote=6, fallbacks=1)]
    delta = transfer_delta(before, after)
    assert delta == TransferCounters(4_999_000, 0.25, 4, 0)
    assert delta.gbytes_per_s == pytest.approx(4_999_000 / 0.25 / 1e9)
    assert delta.bytes_per_remote_prefill == pytest.approx(4_999_000 / 4)
    assert delta.ms_per_remote_prefill == pytest.approx(62.5)


def test_transfer_delta_counts_a_new_or_restarted_worker_from_zero():
    before = [lease("decode0", pid=10, nbytes=900, remote=9)]
    after = [lease("decode0", pid=11, nbytes=100, seconds=0.1, remote=1),  # restarted: another pid
             lease("decode1", nbytes=50, seconds=0.05, remote=1)]  # not there before
    assert transfer_delta(before, after) == TransferCounters(150, pytest.approx(0.15), 2, 0)


def test_transfer_delta_treats_counters_that_went_down_as_a_restart():
    before = [lease(nbytes=900, remote=9)]
    after = [lease(nbytes=100, seconds=0.1, remote=1)]  # same pid and start, but lower counters
    assert transfer_delta(before, after) == TransferCounters(100, 0.1, 1, 0)


def test_no_transfer_has_no_rate():
    empty = TransferCounters()
    assert empty.gbytes_per_s is None and empty.bytes_per_remote_prefill is None
    assert ratio(None, 2.0) is None and ratio(1.0, 0.0) is None and ratio(1.0, 4.0) == 0.25


def record(max_tokens, start, ttft, gaps, ok=True) -> RequestRecord:
    end = start + (ttft + sum(gaps)) / 1000
    return RequestRecord("t", "rate=1/s", 0, 0, max_tokens, ok, start_s=start, end_s=end, ttft_ms=ttft,
                         itl_ms=gaps, output_tokens=len(gaps) + 1, num_chunks=len(gaps) + 1)


def test_chunk_times_follow_the_first_token_and_the_gaps():
    assert chunk_times_s(record(256, 1.0, 100.0, [50.0, 250.0])) == pytest.approx([1.1, 1.15, 1.4])


def test_window_counts_only_what_happened_inside_it():
    stream = record(256, 0.5, 100.0, [400.0, 600.0, 1000.0])  # chunks at 0.6, 1.0, 1.6, 2.6
    long_inside = record(16, 1.2, 300.0, [100.0])  # chunks at 1.5, 1.6
    long_before = record(16, 0.1, 200.0, [])  # sent before the window
    failed = record(16, 1.5, 0.0, [], ok=False)
    w = window_stats([stream, long_inside, long_before, failed], start_s=1.0, end_s=2.0, stream_output_len=256)
    assert w.stream_itl_ms.count == 2 and w.stream_itl_ms.p50 == pytest.approx(500.0)  # gaps ending at 1.0, 1.6
    assert w.output_tok_per_s == pytest.approx(4.0)  # 1.0 and 1.6 of the stream, 1.5 and 1.6 of the long one
    assert w.stream_tok_per_s == pytest.approx(2.0)
    assert w.long_ttft_ms.count == 1 and w.long_ttft_ms.p50 == 300.0
    assert w.stream_ttft_ms.count == 0  # the stream was sent before the window
    assert (w.num_long_sent, w.num_long_ok, w.num_failed) == (2, 1, 1)
    assert (w.num_stalls, w.stall_s) == (2, pytest.approx(1.0))


def test_long_prompts_arrive_only_within_the_duration_with_lengths_in_bounds():
    spec = DisaggSpec(duration_s=20.0, long_input_len=2048, long_input_max=3072)
    sessions = long_sessions(spec, 2.0, seed=1)
    assert 20 <= len(sessions) <= 60
    assert all(2048 <= len(s.turns[0].prompt_ids) <= 3072 for s in sessions)
    assert sessions == long_sessions(spec, 2.0, seed=1)  # the same on every deployment


def test_goal_needs_both_the_itl_gain_and_the_throughput():
    assert Goal(1.0, "agg", 2.5, 1.01).met
    assert not Goal(1.0, "agg", 2.5, 0.97).met and not Goal(1.0, "agg", 1.9, 1.2).met
    assert not Goal(1.0, "agg", None, 1.2).met


def test_kv_block_bytes_of_the_tiny_model():
    # 4 layers, 2 KV heads, head dim 64, 32 tokens, bf16, K and V: 64 KiB
    assert kv_block_bytes(4, 2, 64, 32) == 64 * KIB


def test_default_cases_read_a_prompt_as_vllm_lays_it_out():
    cases = default_cases(64 * KIB, num_layers=4, prompt_blocks=40)
    vllm_like = cases[0]
    assert vllm_like.desc_bytes == 8 * KIB and vllm_like.num_descs == 40 * 8
    assert vllm_like.total_bytes == 40 * 64 * KIB == cases[2].total_bytes
    push = [c for c in cases if c.op == "WRITE"]  # the push's WRITE of a prompt: one descriptor per layer
    assert [(c.num_descs, c.total_bytes, c.fresh_far, c.notify) for c in push] == [
        (4, 40 * 64 * KIB, False, False), (4, 40 * 64 * KIB, True, False), (4, 40 * 64 * KIB, True, True)]
    assert cases[-1].total_bytes == 256 * MIB and cases.index(push[0]) > 2  # after the READs of the prompt


def test_summarize_rates_bytes_over_the_median():
    r = summarize(Case("x", MIB, 1, 3), [0.001, 0.002, 0.010])
    assert r.latency_ms_p50 == pytest.approx(2.0)
    assert (r.latency_ms_min, r.latency_ms_max) == (pytest.approx(1.0), pytest.approx(10.0))
    assert r.gbytes_per_s == pytest.approx(MIB / 0.002 / 1e9)


def test_a_push_is_set_against_the_raw_write_of_its_own_shape():
    cases = default_cases(64 * KIB, num_layers=4, prompt_blocks=40)
    rates = {c.name: 1.0 + i for i, c in enumerate(cases)}  # 1, 2, ... GB/s in the cases' order
    raw = {"setups": {name: {"cases": [{**asdict(c), "gbytes_per_s": rates[c.name]} for c in cases]}
                      for name in ("deployment", "direct")}}
    moved = TransferCounters(kv_bytes=8_000_000_000, kv_seconds=2.0, remote_prefills=10)  # 4 GB/s
    point = PointResult("disagg", "disagg", 1.0, 0, "", window_stats([], 0.0, 1.0, 256), {}, moved, 10)
    [row] = transfer_vs_raw([point], raw)
    write = next(c for c in cases if c.op == "WRITE" and not c.fresh_far)
    assert row["ratio_to_deployment_push_write"] == pytest.approx(4.0 / rates[write.name])
    assert row["ratio_to_direct_vllm_like"] == pytest.approx(4.0 / 1.0)
    assert row["ratio_to_deployment_256MiB"] == pytest.approx(4.0 / len(cases))


def test_the_load_generator_runs_on_the_launchers_cores_while_inside_and_anywhere_after():
    everywhere = os.sched_getaffinity(0)
    one = {min(everywhere)}
    launcher = subprocess.Popen(["taskset", "-c", str(min(everywhere)), "sleep", "60"])
    try:
        wait_for(lambda: os.sched_getaffinity(launcher.pid) == one, 10, "taskset to bind the stand-in launcher")
        with disagg.client_cores(launcher.pid):
            assert os.sched_getaffinity(0) == one
        assert os.sched_getaffinity(0) == everywhere
        with disagg.client_cores(None):
            assert os.sched_getaffinity(0) == everywhere
    finally:
        launcher.kill()
        launcher.wait(timeout=10)
