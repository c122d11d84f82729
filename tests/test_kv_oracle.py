"""The KV-routing benchmark's oracle and working set (bench/kv_oracle.py), and the pure parts of
`bench kv-routing` around them. Pure: no engine, no Redis."""

from __future__ import annotations

import json

from bench.kv_oracle import Blocks, Lru, Request, WorkingSet, pinned, round_robin, simulate
from bench.records import RequestRecord
from bench.workloads import WorkloadKind, WorkloadParams, build_workload

# Blocks of 4 tokens; each system prompt's first 8 tokens (2 blocks) are shared.
BLOCKS = Blocks(4, {0: 8, 1: 8})


def test_blocks_are_shared_per_system_prompt_and_kept_per_conversation():
    a, b = Request(conversation=1, prefix=0, prompt_tokens=17), Request(conversation=2, prefix=0, prompt_tokens=13)
    assert BLOCKS.of(a) == [("p", 0, 0), ("p", 0, 1), ("c", 1, 2), ("c", 1, 3)]
    assert BLOCKS.of(b)[:2] == BLOCKS.of(a)[:2] and BLOCKS.of(b)[2:] == [("c", 2, 2)]
    # A later turn's prompt extends the earlier one's: its leading blocks are the same names.
    assert BLOCKS.of(Request(1, 0, 25))[:4] == BLOCKS.of(a)
    assert BLOCKS.max_hit(Request(1, 0, 16)) == 3  # the last token is always computed


def test_lru_hits_leading_blocks_in_a_row_and_evicts_the_oldest():
    lru = Lru(capacity_blocks=3)
    lru.touch(["a", "b", "c"])
    assert lru.hits(["a", "b", "x", "c"], limit=4) == 2 and lru.hits(["a", "b", "c"], limit=2) == 2
    lru.touch(["a", "d"])  # b is now the oldest
    assert lru.hits(["b"], limit=1) == 0 and lru.hits(["a", "c", "d"], limit=3) == 3


def test_pinned_oracle_keeps_each_prompt_on_one_worker_where_round_robin_thrashes():
    # Two prompts, each request on a new conversation, 9 tokens: 2 full blocks, both shared.
    order = [0, 0, 1, 1, 0, 0, 1, 1]
    requests = [Request(i, prefix, 9) for i, prefix in enumerate(order)]
    oracle = simulate(requests, BLOCKS, num_workers=2, capacity_blocks=2, policy=pinned(2))
    rr = simulate(requests, BLOCKS, num_workers=2, capacity_blocks=2, policy=round_robin(2))
    assert oracle.hit_tokens == 6 * 8 and oracle.requests_per_worker == [4, 4]
    assert rr.hit_tokens == 0 and rr.hit_rate == 0.0  # each worker sees both prompts, room for one
    assert oracle.prefill_tokens_per_worker == [9 + 3 * 1, 9 + 3 * 1]
    # With room for both prompts, round-robin hits on each worker's second sight of each.
    assert simulate(requests, BLOCKS, 2, 4, round_robin(2)).hit_tokens == 4 * 8


def test_pinned_places_new_prompts_on_the_worker_with_fewer():
    place = pinned(2)
    assert [place(i, Request(i, p, 9)) for i, p in enumerate([5, 5, 7, 9, 7, 5])] == [0, 0, 1, 0, 1, 0]


def test_working_set_counts_blocks_that_will_be_used_again():
    requests = [Request(1, 0, 12), Request(2, 1, 8), Request(1, 0, 16), Request(2, 1, 8)]
    ws = WorkingSet.of(requests, BLOCKS)
    # After each request: {p0 x2, c1.2} ; + {p1 x2} ; p0 and c1.2 done ; p1 done.
    assert (ws.peak_blocks, ws.mean_blocks, ws.shared_blocks) == (5, (3 + 5 + 2 + 0) / 4, 4)


def test_multiturn_hot_prefix_share():
    p = WorkloadParams(turns_per_session=2, num_system_prompts=4, system_prompt_words=5, user_turn_words=2)
    uniform = build_workload(WorkloadKind.MULTITURN, p, 20, seed=0)
    systems = list(dict.fromkeys(s.system_text for s in uniform))
    assert [systems.index(s.system_text) for s in uniform] == [i % 4 for i in range(10)]
    from dataclasses import replace

    skewed = build_workload(WorkloadKind.MULTITURN, replace(p, hot_prefix_share=0.5), 20, seed=0)
    counts = {t: sum(s.system_text == t for s in skewed) for t in {s.system_text for s in skewed}}
    assert sorted(counts.values()) == [1, 2, 2, 5]  # half on one prompt, the rest in turn over three


def test_routed_per_worker_spread_and_block_bytes(tmp_path):
    from bench.kv_routing import kv_block_bytes, kv_cache_gib, routed_per_worker, spread

    log = ("[router] 2026-12-04 INFO [r1] routed to decode-a@h (kv): overlap 3/40 blocks; cost x\n"
           "[router] [r2] routed to decode-b@h (kv): overlap 0/40 blocks\n"
           "[router] [r3] routed to decode-a@h (kv): overlap 40/41 blocks\n"
           "[router] [r4] routed to decode-b@h (round-robin): overlap 0/40 blocks\n")
    assert routed_per_worker(log, "kv") == {"decode-a@h": 2, "decode-b@h": 1}
    assert spread([2, 1]) == 2.0 and spread([3, 0]) is None
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 8, "hidden_size": 512,
                                                      "num_hidden_layers": 4, "num_key_value_heads": 2}))
    assert kv_block_bytes(tmp_path, 32) == 65536  # bench-llama: 4 layers x K,V x 2 heads x 64 x 32 x 2 bytes
    assert kv_cache_gib(16384, 65536) == 1.0


def test_oracle_figures_use_the_order_sent():
    from bench.kv_routing import oracle_figures

    p = WorkloadParams(turns_per_session=1, num_system_prompts=2, system_prompt_words=5, user_turn_words=2)
    sessions = build_workload(WorkloadKind.MULTITURN, p, 4, seed=0, variant=1)  # prompts 0, 1, 0, 1

    def rec(session_id, start_s, ok=True):
        return RequestRecord("kv", "c=1", session_id, 0, 4, ok, start_s=start_s, prompt_tokens=9)

    shared = {s.system_text: 8 for s in sessions}
    records = [rec(3, 0.3), rec(0, 0.0), rec(2, 0.2), rec(1, 0.1), rec(1, 0.4, ok=False)]
    figures = oracle_figures(records, sessions, shared, block_size=4, capacity_blocks=2)
    assert figures.oracle_hit_rate == 16 / 36 and figures.oracle_requests_per_worker == [2, 2]
    assert figures.simulated_round_robin_hit_rate == 16 / 36  # 0, 1, 0, 1: each worker keeps one prompt
    assert figures.working_set.shared_blocks == 4 and figures.working_set_ratio == figures.working_set.mean_blocks / 2
