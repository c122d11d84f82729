"""The router service on a real Redis (streams, XTRIM, XINFO, WATCH, leases), with no engine.

Index snapshots: a router that starts after the KV event stream was trimmed still builds the index
that a router which saw every event has (the index round trip itself is pure). And the modes other
than kv: random and round-robin spread requests over the live workers, whatever they cache."""

import logging
import time

import msgspec
import pytest
import redis

from config import load_settings
from router.index import RadixIndex
from router.runtime import RouterRuntime
from router.service import RouterService
from router.snapshots import stream_id
from tasks import keys
from tasks.messages import (
    GenerateRequest,
    KvEvent,
    SamplingSpec,
    encode_kv_event,
    request_from_task_arg,
    request_to_task_arg,
)
from tasks.queues import worker_queue
from tasks.registry import WorkerStatus, renew_lease
from test_router_index import BS, blocks, content, store_chain


def test_an_index_restores_to_the_same_content_and_keeps_working():
    index = RadixIndex(BS)
    a = store_chain(index, "w1", blocks(1, 2, 3, 4))
    store_chain(index, "w2", blocks(1, 2, 5))
    index.store("w2", [b"w2-x"], b"w2-1", blocks(6))  # continues w2's chain after block 2
    index.remove("w1", a[3:])
    restored = RadixIndex.restore(BS, *index.state())
    assert content(restored) == content(index)
    for prompt in (blocks(1, 2, 3), blocks(1, 2, 6), blocks(1, 2, 5, 9), blocks(7)):
        assert restored.overlaps(prompt) == index.overlaps(prompt)
    # Later events apply to the restored index as to the original, removals by engine hash too.
    for i in (index, restored):
        i.remove("w1", a[1:3])
        i.clear("w2")
    assert content(restored) == content(index)
    assert restored.overlaps(blocks(1, 2)) == {"w1": 1}


@pytest.fixture
def client(scratch_redis_url):
    client = redis.Redis.from_url(scratch_redis_url)
    client.delete(keys.KV_EVENTS, keys.KV_INDEX_SNAPSHOT, keys.ROUTER_ROUND_ROBIN, *WORKER_LEASES)
    yield client
    client.delete(keys.KV_EVENTS, keys.KV_INDEX_SNAPSHOT, keys.ROUTER_ROUND_ROBIN, *WORKER_LEASES)


WORKERS = ["decode0@a", "decode1@a", "decode2@b"]
WORKER_LEASES = [keys.worker_lease(w) for w in WORKERS]


def lease_workers(client) -> None:
    for worker in WORKERS:
        renew_lease(client, WorkerStatus(worker, "decode", [], "a", 1, 0.0, 0.0), lease_s=60)


def router(client, trim_margin_s: float = 0.0, **overrides) -> RouterService:
    """A router replica. Its trim keeps no margin unless asked: the events here are all
    written within a second."""
    settings = load_settings("configs/agg_router.yaml", ["router.snapshot_every_events=0",
                                                         *(f"router.{k}={v}" for k, v in overrides.items())])
    service = RouterService(settings, client)
    service.snapshots.trim_margin_s = trim_margin_s
    return service


ENGINE_BS = router(None).index.block_size


def engine_blocks(*values):
    return [v for value in values for v in [value] * ENGINE_BS]


def xadd(client, event: KvEvent) -> None:
    # One millisecond of entry id per event, as if each came a moment after the last: a trim
    # is by time (MINID), and these are all written within a few real milliseconds.
    last = client.xinfo_stream(keys.KV_EVENTS)["last-generated-id"] if client.exists(keys.KV_EVENTS) else b"0-0"
    client.xadd(keys.KV_EVENTS, {"e": encode_kv_event(event)}, id=f"{stream_id(last)[0] + 1}-0")


def append(client, worker: str, first: int, n: int) -> None:
    """n stored chains and every other one removed again, as engine events."""
    for i in range(first, first + n):
        hashes = [f"{worker}-{i}-{j}".encode() for j in range(3)]
        xadd(client, KvEvent(worker, "stored", hashes, None, engine_blocks(i % 7, i, i + 1)))
        if i % 2:
            xadd(client, KvEvent(worker, "removed", hashes[1:]))


def test_a_late_router_starts_from_the_snapshot_of_a_trimmed_stream(client):
    live = router(client)
    append(client, "w1", 0, 20)
    append(client, "w2", 0, 10)
    live.events.catch_up()
    assert live.snapshots.save()
    # The stream is trimmed up to the snapshot: the events before it are gone.
    assert client.xlen(keys.KV_EVENTS) < 45
    append(client, "w1", 20, 5)
    xadd(client, KvEvent("w2", "cleared"))
    live.events.catch_up()

    late = router(client)
    assert late.events.replay() == 5 + 2 + 1  # stored, removed (odd ones), cleared
    assert content(late.index) == content(live.index)
    # ... and the stream alone no longer holds it (a router that never looks for a trim).
    stream_only = router(client, trim_margin_s=float("inf"))
    stream_only.events.catch_up()
    assert content(stream_only.index) != content(live.index)
    assert late.index.blocks_per_worker() == {"w1": live.index.blocks_per_worker()["w1"]}


def snapshot_ahead(client, trim_margin_s: float) -> tuple[RouterService, RouterService]:
    """Two replicas; the one ahead saves a snapshot while the other is 10 chains behind."""
    ahead, behind = router(client, trim_margin_s), router(client, trim_margin_s)
    append(client, "w1", 0, 10)
    behind.events.catch_up()
    append(client, "w1", 10, 10)
    ahead.events.catch_up()
    assert ahead.snapshots.save()
    return ahead, behind


def test_a_router_behind_a_trim_reloads_and_an_older_snapshot_never_replaces_a_newer(client):
    ahead, behind = snapshot_ahead(client, trim_margin_s=0)
    # The replica behind would have saved an index without the events after its cursor, which
    # the stream no longer holds.
    assert not behind.snapshots.save()
    assert behind.snapshots.reload_if_trimmed()
    assert content(behind.index) == content(ahead.index)
    assert not behind.snapshots.reload_if_trimmed()
    # A router reading on after a pause finds such a gap by itself.
    paused = router(client)
    append(client, "w1", 20, 4)
    paused.events.catch_up()
    append(client, "w1", 24, 4)
    ahead.events.catch_up()
    assert ahead.snapshots.save()
    append(client, "w1", 28, 4)
    ahead.events.catch_up()
    paused.events.catch_up()
    assert content(paused.index) == content(ahead.index)


def test_a_replica_a_little_behind_a_trim_loses_nothing(client):
    ahead, behind = snapshot_ahead(client, trim_margin_s=60)
    # The trim kept the last minute, so the replica behind reads on as if nothing happened.
    assert not behind.snapshots.reload_if_trimmed()
    behind.events.catch_up()
    assert content(behind.index) == content(ahead.index)


def test_snapshots_follow_the_configured_interval(client):
    replica = router(client, snapshot_every_events=10)
    append(client, "w1", 0, 4)  # 6 events
    replica.events.catch_up()
    assert not replica.snapshots.save_if_due()
    append(client, "w1", 4, 4)
    replica.events.catch_up()
    assert replica.snapshots.save_if_due()
    assert stream_id(client.hget(keys.KV_INDEX_SNAPSHOT, "cursor")) == stream_id(
        client.xrevrange(keys.KV_EVENTS, count=1)[0][0])


def test_a_trim_with_no_snapshot_is_reported(client, caplog):
    append(client, "w1", 0, 10)
    client.xtrim(keys.KV_EVENTS, maxlen=3, approximate=False)  # the workers' backstop
    late = router(client)
    with caplog.at_level(logging.WARNING, logger="router.snapshots"):
        late.events.replay()
    assert "trimmed with no snapshot covering them" in caplog.text


def test_round_robin_takes_the_live_workers_in_turn(client):
    lease_workers(client)
    append(client, "decode0@a", 0, 3)  # what a worker caches does not matter in this mode
    first, second = router(client, mode="round-robin"), router(client, mode="round-robin")
    # Two replicas share the turn through Redis, so together they still go round.
    chosen = [(first if i % 2 else second).decide(engine_blocks(1, 2)).worker_id for i in range(6)]
    assert sorted(chosen[:3]) == WORKERS and chosen[3:] == chosen[:3]


def test_random_spreads_over_the_live_workers_only(client):
    lease_workers(client)
    client.delete(WORKER_LEASES[2])
    service = router(client, mode="random")
    decisions = [service.decide(engine_blocks(1, 2)) for _ in range(40)]
    assert {d.worker_id for d in decisions} == set(WORKERS[:2])
    assert all(d.mode == "random" and d.overlap_blocks == 0 and d.prompt_blocks == 2 for d in decisions)


def test_the_router_forwards_the_typed_request_with_its_prefix_hit(client, scratch_redis_url):
    lease_workers(client)
    xadd(client, KvEvent(WORKERS[1], "stored", [b"h1", b"h2"], None, engine_blocks(1, 2)))
    settings = load_settings("configs/agg_router.yaml", [f"redis_url={scratch_redis_url}", "router.mode=kv",
                                                         "router.temperature=0"])
    runtime = RouterRuntime(settings, "router0@a", ["router"])
    req = GenerateRequest("fwd-1", engine_blocks(1, 2, 3), SamplingSpec(max_tokens=4), time.time() + 60)
    sent = []
    try:
        runtime.route(req, lambda routed, queue: sent.append((routed, queue)))
    finally:
        client.delete(keys.output_stream(req.request_id), keys.ROUTER_OVERLAP_BLOCKS, keys.ROUTER_PROMPT_BLOCKS)
    [(routed, queue)] = sent
    # The request the router parsed, with only the routing field set, to the holder's own queue.
    assert queue.name == worker_queue(WORKERS[1]).name
    assert routed == msgspec.structs.replace(req, prefix_hit_tokens=2 * ENGINE_BS)
    assert request_from_task_arg(request_to_task_arg(routed)) == routed


@pytest.mark.parametrize("mode", ["round-robin", "random", "kv"])
def test_excluded_workers_are_never_chosen(client, mode):
    # A migrated request names the workers it lost (GenerateRequest.exclude_workers), which the
    # router may still see as live for a moment.
    lease_workers(client)
    xadd(client, KvEvent(WORKERS[1], "stored", [b"h1", b"h2"], None, engine_blocks(1, 2)))
    service = router(client, mode=mode)
    chosen = {service.decide(engine_blocks(1, 2), exclude=[WORKERS[1]]).worker_id for _ in range(12)}
    assert WORKERS[1] not in chosen and chosen <= set(WORKERS)


def test_with_every_worker_excluded_there_is_no_candidate(client):
    from router.service import NoCandidates

    lease_workers(client)
    with pytest.raises(NoCandidates, match="other than decode0@a, decode1@a, decode2@b"):
        router(client, mode="round-robin").decide(engine_blocks(1), exclude=WORKERS)


def test_kv_decisions_count_their_work_and_a_departed_worker_loses_its_share(client):
    lease_workers(client)
    service = router(client, mode="kv")
    weights = service.config
    assert (weights.overlap_weight, weights.balance_weight) == (4.0, 8.0)
    first = service.decide(engine_blocks(1, 2))
    # Nobody holds the prompt: the worker computes all of it, so the decision counts 2.
    assert service.recent.work(first.worker_id) == 2.0
    second = service.decide(engine_blocks(3, 4))
    mine = next(c for c in second.candidates if c.worker_id == first.worker_id)
    assert mine.recent_work == 2.0
    assert mine.cost == 4.0 * mine.prefill_blocks + mine.decode_blocks + 8.0 * 2.0
    assert second.worker_id != first.worker_id
    client.delete(keys.worker_lease(first.worker_id))
    service.members.refresh(fresh=True)
    assert service.recent.work(first.worker_id) == 0.0
