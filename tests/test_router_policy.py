"""The routing cost, the choice, and booking."""

import random
from collections import Counter

import pytest

from router.policy import Bookings, Candidate, RecentDecisions, choose, cost, decision_work


def cand(worker, prefill, decode, requests=0, weight=1.0, overlap=0, recent=0.0, balance=0.0):
    return Candidate(worker, overlap, prefill, decode, requests, cost(prefill, decode, weight, recent, balance),
                     recent)


def test_cost_weighs_prefill_against_decode():
    assert cost(10, 5, 1.0) == 15
    assert cost(10, 5, 2.0) == 25
    assert cost(10, 5, 0.0) == 5


def test_cost_adds_the_balance_weight_per_unit_of_recent_work():
    assert cost(10, 5, 2.0, recent_work=3.0, balance_weight=4.0) == 25 + 12
    assert cost(10, 5, 2.0, recent_work=3.0) == 25  # weight 0: Dynamo's formula


def test_a_decision_counts_its_request_and_the_share_of_its_prompt_computed():
    assert decision_work(prefill_blocks=0, prompt_blocks=36) == 1.0  # a full hit
    assert decision_work(prefill_blocks=36, prompt_blocks=36) == 2.0  # a full miss
    assert decision_work(prefill_blocks=9, prompt_blocks=36) == 1.25
    assert decision_work(prefill_blocks=0, prompt_blocks=0) == 1.0  # a prompt shorter than a block


def test_recent_decisions_sum_the_last_window_only():
    r = RecentDecisions(window=4)
    for w, work in (("a", 2.0), ("a", 1.0), ("a", 1.0), ("b", 1.5)):
        r.record(w, work)
    assert (r.work("a"), r.work("b")) == (4.0, 1.5)
    r.record("b", 1.0)
    r.record("b", 1.0)  # the two oldest of "a" fall out of the window
    assert (r.work("a"), r.work("b"), r.work("c")) == (1.0, 3.5, 0.0)
    r.forget("b")
    assert (r.work("a"), r.work("b")) == (1.0, 0.0)
    r.record("c", 2.0)
    assert (r.work("a"), r.work("c")) == (1.0, 2.0)


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


def test_the_configured_balance_term_places_a_new_prefix_by_recent_share():
    """With 2 requests in flight the momentary load is whichever worker the other request is on:
    here "b", with a cold prefill's blocks booked, while "a" took 22 of the last 32 requests (work
    24) and "b" 10 (work 12). A new prefix, which no worker holds, then goes by the share: 12 units
    of work are 96 blocks, more than the 84. Without the term it goes to "a", and its later
    requests follow it there."""
    from config import load_settings

    router = load_settings("configs/agg_router.yaml", [], environ={}).router
    assert (router.balance_weight, router.balance_window) == (8.0, 32)
    rng = random.Random(0)

    def pick(balance):
        a = cand("a", prefill=36, decode=0, weight=router.overlap_weight, recent=24.0, balance=balance)
        b = cand("b", prefill=36, decode=84, weight=router.overlap_weight, recent=12.0, balance=balance)
        return choose([a, b], router.temperature, rng).worker_id

    assert pick(0.0) == "a"
    assert pick(router.balance_weight) == "b"


def _stream(prefixes: list[int], balance_weight: float) -> tuple[Counter, Counter, dict[int, set[str]]]:
    """Conversations of 4 requests, one at a time, each over a 34-block prefix (`prefixes[i]`),
    with configs/agg_router.yaml's weights and idle-looking workers (no momentary load, as between
    requests at low load). A conversation's later requests find its blocks only on the worker
    that took its first; a first request finds its prefix on every worker that computed it.
    Returns the requests and the prompt blocks computed per worker, and each prefix's holders."""
    from config import load_settings

    router = load_settings("configs/agg_router.yaml", [], environ={}).router
    rng, recent = random.Random(0), RecentDecisions(router.balance_window)
    holders: dict[int, set[str]] = {}
    taken: Counter = Counter()
    computed: Counter = Counter()
    for prefix in prefixes:
        home = None
        for turn in range(4):
            prompt = 36 + 3 * turn
            cands = []
            for w in ("a", "b"):
                held = w == home if turn else w in holders.get(prefix, set())
                overlap = prompt - 2 if held else 0
                cands.append(cand(w, prefill=prompt - overlap, decode=0, weight=router.overlap_weight,
                                  overlap=overlap, recent=recent.work(w), balance=balance_weight))
            pick = choose(cands, router.temperature, rng)
            recent.record(pick.worker_id, decision_work(pick.prefill_blocks, prompt))
            holders.setdefault(prefix, set()).add(pick.worker_id)
            home = home or pick.worker_id
            taken[pick.worker_id] += 1
            computed[pick.worker_id] += pick.prefill_blocks
    return taken, computed, holders


def spread(counts: Counter) -> float:
    return max(counts["a"], counts["b"]) / max(min(counts["a"], counts["b"]), 1)


@pytest.mark.parametrize("prefixes", [[0] * 16, list(range(1, 9)) + [0] * 16],
                         ids=["one prefix", "8 new prefixes, then one prefix"])
def test_a_hot_prefix_does_not_herd_its_traffic_onto_one_worker(prefixes):
    """A run of conversations over one prefix. Without the balance term every request stays on
    the worker that computed the prefix first, whatever the load it has taken; with it, once that
    worker's share of the recent work runs far enough ahead, the prefix is computed on the other
    worker too, and both the requests and the prompt blocks computed split within 1.5x."""
    without, _, before = _stream(prefixes, 0.0)
    with_term, computed, after = _stream(prefixes, 8.0)
    assert len(before[0]) == 1 and spread(without) > 10
    assert after[0] == {"a", "b"}
    assert spread(with_term) <= 1.5 and spread(computed) <= 1.5


def test_the_balance_term_leaves_a_prefix_home_at_an_even_share():
    """Two workers with the same recent work: a cached prefix keeps its requests as before, and
    it takes 18 units of work more (18 x 8 > 4 x 34) to move one."""
    rng = random.Random(0)

    def pick(recent_holder, recent_other):
        holder = cand("holder", prefill=2, decode=0, weight=4.0, overlap=34, recent=recent_holder, balance=8.0)
        other = cand("other", prefill=36, decode=0, weight=4.0, recent=recent_other, balance=8.0)
        return choose([holder, other], 0, rng).worker_id

    assert pick(16.0, 16.0) == "holder"
    assert pick(24.0, 8.0) == "holder"
    assert pick(25.0, 7.0) == "other"
