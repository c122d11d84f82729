"""Unit tests for bench/disagg.py and bench/nixl_bandwidth.py's pure parts: no engines, no NIXL."""

from __future__ import annotations

import pytest

from bench.disagg import TransferCounters, class_latencies, ratio, transfer_delta
from bench.nixl_bandwidth import KIB, MIB, Case, default_cases, kv_block_bytes, summarize
from bench.records import RequestRecord
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


def record(max_tokens, ttft, gaps, ok=True) -> RequestRecord:
    end = (ttft + sum(gaps)) / 1000
    return RequestRecord("t", "c=2", 0, 0, max_tokens, ok, start_s=0.0, end_s=end, ttft_ms=ttft, itl_ms=gaps,
                         output_tokens=len(gaps) + 1)


def test_class_latencies_split_long_and_short_requests_by_max_tokens():
    records = [record(16, 300.0, [5.0] * 15), record(192, 20.0, [10.0, 30.0]), record(192, 40.0, [20.0]),
               record(16, 900.0, [], ok=False)]
    c = class_latencies(records, long_output_len=16)
    assert (c.long_ok, c.short_ok) == (1, 2)
    assert c.long_ttft_ms.p50 == 300.0
    assert c.short_ttft_ms.p50 == 30.0
    assert c.short_itl_ms.count == 3 and c.short_itl_ms.p50 == 20.0
    assert c.short_tpot_ms.count == 2


def test_kv_block_bytes_of_the_tiny_model():
    # 4 layers, 2 KV heads, head dim 64, 32 tokens, bf16, K and V: 64 KiB
    assert kv_block_bytes(4, 2, 64, 32) == 64 * KIB


def test_default_cases_read_a_prompt_as_vllm_lays_it_out():
    cases = default_cases(64 * KIB, num_layers=4, prompt_blocks=40)
    vllm_like = cases[0]
    assert vllm_like.desc_bytes == 8 * KIB and vllm_like.num_descs == 40 * 8
    assert vllm_like.total_bytes == 40 * 64 * KIB == cases[2].total_bytes
    assert cases[-1].total_bytes == 256 * MIB


def test_summarize_rates_bytes_over_the_median():
    r = summarize(Case("x", MIB, 1, 3), [0.001, 0.002, 0.010])
    assert r.latency_ms_p50 == pytest.approx(2.0)
    assert (r.latency_ms_min, r.latency_ms_max) == (pytest.approx(1.0), pytest.approx(10.0))
    assert r.gbytes_per_s == pytest.approx(MIB / 0.002 / 1e9)
