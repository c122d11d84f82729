"""The routing cost, the choice, and booking."""

import random
from collections import Counter

import pytest

from router.policy import Bookings, Candidate, choose, cost


def cand(worker, prefill, decode, requests=0, weight=1.0, overlap=0):
    return Candidate(worker, overlap, prefill, decode, requests, cost(prefill, decode, weight))


def test_cost_weighs_prefill_against_decode():
    assert cost(10, 5, 1.0) == 15
    assert cost(10, 5, 2.0) == 25
    assert cost(10, 5, 0.0) == 5


def test_overlap_wins_when_load_is_equal():
    rng = random.Random(0)
    holder, other = cand("a", prefill=2, decode=10, overlap=8), cand("b", prefill=10, decode=10)
    assert choose([other, holder], 0, rng).worker_id == "a"


def test_load_wins_over_a_small_overlap():
    rng = random.Random(0)
    busy, idle = cand("a", prefill=9, decode=50, overlap=1), cand("b", prefill=10, decode=0)
    assert choose([busy, idle], 0, rng).worker_id == "b"


def test_ties_go_to_fewer_requests_then_random():
    rng = random.Random(0)
    assert choose([cand("a", 1, 1, requests=3), cand("b", 1, 1, requests=1)], 0, rng).worker_id == "b"
    picks = Counter(choose([cand("a", 1, 1), cand("b", 1, 1)], 0, rng).worker_id for _ in range(200))
    assert set(picks) == {"a", "b"}


def test_temperature_spreads_near_equal_workers():
    rng = random.Random(1)
    cands = [cand("a", 10, 0), cand("b", 11, 0)]
    picks = Counter(choose(cands, 1.0, rng).worker_id for _ in range(500))
    assert picks["a"] > picks["b"] > 50
    cold = Counter(choose(cands, 0.01, rng).worker_id for _ in range(200))
    assert cold["a"] == 200


def test_no_candidates():
    with pytest.raises(ValueError):
        choose([], 0, random.Random())


def test_bookings_count_until_the_worker_catches_up():
    b = Bookings(lag_s=1.0)
    b.book("w", 5, now_unix=100.0)
    b.book("w", 3, now_unix=100.5)
    assert b.pending("w") == (8, 2)
    b.settle("w", report_unix=100.9)  # reports older than booking + lag change nothing
    assert b.pending("w") == (8, 2)
    b.settle("w", report_unix=101.2)
    assert b.pending("w") == (3, 1)
    b.settle("w", report_unix=102.0)
    assert b.pending("w") == (0, 0)


def test_bookings_spread_a_burst_that_shares_a_prefix():
    """A burst of requests sharing a prefix held by one worker: booking makes the holder look
    busier with every request sent its way, so the burst spills over instead of piling up."""
    rng, b = random.Random(0), Bookings(lag_s=1.0)
    chosen = []
    for i in range(6):
        cands = []
        for worker, overlap in (("holder", 4), ("other", 0)):
            booked, reqs = b.pending(worker)
            cands.append(cand(worker, prefill=5 - overlap, decode=booked, requests=reqs, overlap=overlap))
        pick = choose(cands, 0, rng)
        b.book(pick.worker_id, pick.prefill_blocks + 1, now_unix=100.0 + i * 0.01)
        chosen.append(pick.worker_id)
    assert chosen[0] == "holder"
    assert "other" in chosen


def test_the_configured_weight_keeps_a_prefix_home_until_its_holder_is_much_busier():
    """configs/agg_router.yaml's weight (4) on kv-routing's shapes: a 40-block prompt whose
    34-block prefix one worker holds. A burst of it stays on the holder while that worker's extra
    load is under 4 x 34 blocks, then spills over: a hot prefix does not herd onto one worker."""
    from config import load_settings

    weight = load_settings("configs/agg_router.yaml", [], environ={}).router.overlap_weight
    assert weight == 4.0
    rng, b = random.Random(0), Bookings(lag_s=1.0)
    chosen = []
    for i in range(60):
        cands = []
        for worker, overlap in (("holder", 34), ("other", 0)):
            booked, reqs = b.pending(worker)
            cands.append(cand(worker, prefill=40 - overlap, decode=booked, requests=reqs, weight=weight,
                              overlap=overlap))
        pick = choose(cands, 0, rng)
        b.book(pick.worker_id, pick.prefill_blocks + 1, now_unix=100.0 + i * 0.01)
        chosen.append(pick.worker_id)
    first_spill = chosen.index("other")
    # The holder takes requests while booked 7 blocks each stay within 4 x 34 = 136 blocks.
    assert first_spill == 136 // 7 + 1
    # After that, each request the other worker takes (41 blocks booked) buys the holder 6 more.
    assert chosen[first_spill:].count("other") == pytest.approx((60 - first_spill) / 7, abs=1)


def test_forget():
    b = Bookings(lag_s=1.0)
    b.book("w", 5, 1.0)
    b.forget("w")
    assert b.pending("w") == (0, 0)
