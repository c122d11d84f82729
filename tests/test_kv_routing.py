"""KV-aware routing against real engines: two decode workers, a kv-mode router, real KV events.

The tests run in order on one deployment; each states the state it starts from.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from config import dump_settings
from conftest import ROOT, fresh_redis_url, live_status, make_settings, start_deployment, stored_blocks, wait_for
from router.index import block_keys
from router.service import RouterService
from tasks import keys, registry
from test_router_index import content

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"
BLOCK = 32
SHARED = [10 + (i * 37) % 1500 for i in range(20 * BLOCK)]  # 20 blocks of a shared "system prompt"
OTHER = [10 + (i * 53) % 1500 for i in range(20 * BLOCK)]
# Sent only by the kill test: earlier tests may have placed SHARED on both workers.
LAST = [10 + (i * 89) % 1500 for i in range(20 * BLOCK)]


def prompt(prefix: list[int], turn: int) -> list[int]:
    return prefix + [100 + turn, 200 + turn, 300 + turn]


@pytest.fixture(scope="module")
def routed(model_path, tmp_path_factory):
    # These tests check the overlap and the momentary load against real engines, each from a state
    # it states. The balance term (tests/test_router_policy.py, tests/test_router_service.py) would
    # carry each test's decisions into the next: after the first test's six requests to one worker,
    # it sent the second test's first request, a hit there, to the other.
    settings = make_settings(fresh_redis_url(), base="agg_router.yaml", **{"router.balance_weight": "0"})
    assert settings.router.mode == "kv" and settings.workers.num_decode == 2
    dep = start_deployment(settings, tmp_path_factory.mktemp("kv"))
    wait_for(lambda: len(live_status(dep)) == 2, 120, "both decode workers")
    yield dep
    dep.stop()


def complete(dep, ids: list[int], max_tokens: int = 2):
    raw = dep.client().completions.with_raw_response.create(model=MODEL, prompt=ids, max_tokens=max_tokens,
                                                            extra_body={"ignore_eos": True})
    out = raw.parse()
    assert out.usage.completion_tokens == max_tokens
    return raw.headers["x-worker-id"], int(raw.headers["x-overlap-blocks"]), int(raw.headers["x-prompt-blocks"])


def router_status(dep, name_prefix: str = "router0@"):
    return next(w for w in live_status(dep, role="router") if w.worker_id.startswith(name_prefix))


def test_shared_prefix_sticks_to_the_worker_that_holds_it(routed):
    holder, overlap, blocks = complete(routed, prompt(SHARED, 0))
    assert blocks == 20 and overlap == 0
    # The engine's KV events reach the stream the router replays; wait for them, not for a time.
    wait_for(lambda: stored_blocks(routed, holder) >= 20, 30, "the holder's KV events")
    for turn in range(1, 6):
        worker, overlap, blocks = complete(routed, prompt(SHARED, turn))
        assert worker == holder, f"turn {turn} left the worker holding the prefix"
        assert overlap == 20
    rate = int(routed.redis.get(keys.ROUTER_OVERLAP_BLOCKS)) / int(routed.redis.get(keys.ROUTER_PROMPT_BLOCKS))
    assert rate == pytest.approx(100 / 120)


def test_a_different_prefix_goes_to_the_less_loaded_worker(routed):
    holder, _, _ = complete(routed, prompt(SHARED, 9))
    # Keep the holder busy with a long request, then send a prefix nobody holds.
    stream = routed.client().completions.create(model=MODEL, prompt=prompt(SHARED, 10), max_tokens=1200,
                                                stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    worker, overlap, _ = complete(routed, prompt(OTHER, 0))
    stream.close()
    assert worker != holder and overlap == 0


def test_a_request_with_several_prompts_says_where_each_went(routed):
    raw = routed.client().completions.with_raw_response.create(
        model=MODEL, prompt=[prompt(SHARED, 40), OTHER[:5 * BLOCK]], max_tokens=2, extra_body={"ignore_eos": True})
    assert len(raw.parse().choices) == 2
    workers = raw.headers["x-worker-id"].split(",")
    assert len(workers) == 2 and all(w.startswith("decode") for w in workers)
    assert raw.headers["x-prompt-blocks"].split(",") == ["20", "5"]
    overlaps = [int(v) for v in raw.headers["x-overlap-blocks"].split(",")]
    assert len(overlaps) == 2 and overlaps[0] <= 20 and overlaps[1] <= 5


def test_the_router_hashes_prompts_as_the_engine_stored_them(routed):
    """Self-check: the router's own hashes of a prompt are exactly the keys it derived from the
    blocks the engine reported storing for that prompt."""
    ids = [10 + (i * 71) % 1500 for i in range(6 * BLOCK + 5)]
    worker, _, _ = complete(routed, ids, max_tokens=1)
    service = RouterService(routed.settings, routed.redis)

    def indexed() -> bool:
        service.events.replay()
        return {k for k, _ in block_keys(ids, BLOCK)} <= service.index.blocks_of(worker)

    wait_for(indexed, 30, "the prompt's blocks in a replayed index")
    assert service.index.overlaps(ids)[worker] == 6
    # Every engine batch reached the stream: none lost, and vLLM's replay buffer answered.
    assert "KV event batch(es) lost" not in routed.log()
    assert "replay did not answer" not in routed.log()


def test_a_late_router_replays_to_the_same_index_and_decisions(routed, tmp_path):
    # A replica that has read the whole stream saves the index and trims the stream up to it,
    # as routers do every router.snapshot_every_events events (with no margin kept here).
    complete(routed, prompt(OTHER, 30))
    whole = RouterService(routed.settings, routed.redis)
    whole.snapshots.trim_margin_s = 0
    whole.events.catch_up()
    assert whole.snapshots.save()
    assert routed.redis.xinfo_stream(keys.KV_EVENTS)["entries-added"] > routed.redis.xlen(keys.KV_EVENTS)
    holder, overlap, _ = complete(routed, prompt(SHARED, 20))  # traffic after the snapshot

    cfg = tmp_path / "config.yaml"
    dump_settings(routed.settings, cfg)
    late = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", "router", "-n",
                             "router9@%h", "--loglevel", "INFO"], cwd=ROOT, env=dict(os.environ, LLMQ_CONFIG=str(cfg)),
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "late-router.log").open("w"))
    try:
        late_status = wait_for(lambda: next((w for w in live_status(routed, role="router")
                                             if w.worker_id.startswith("router9@")), None), 60, "the late router")
        # The late router (snapshot, then the rest of the stream) and the live one agree.
        wait_for(lambda: router_status(routed, "router9@").index_blocks == router_status(routed).index_blocks,
                 10, "the late router to catch up")
        assert sum(late_status.index_blocks.values()) > 0
        # Block for block: snapshot plus the stream after it is the whole stream.
        fresh = RouterService(routed.settings, routed.redis)
        fresh.events.replay()
        wait_for(lambda: (whole.events.catch_up(), fresh.events.catch_up())
                 and content(fresh.index) == content(whole.index),
                 10, "the snapshot-started index to equal the whole stream's")
        # And it decides as the live router did.
        decision = fresh.decide(prompt(SHARED, 21))
        assert (decision.worker_id, decision.overlap_blocks) == (holder, overlap)
    finally:
        late.send_signal(signal.SIGTERM)
        late.wait(timeout=30)
    # A router that stopped cleanly leaves the registry at once, not when its lease lapses.
    assert not registry.is_alive(routed.redis, late_status.worker_id), \
        (tmp_path / "late-router.log").read_text()[-3000:]


def test_router_metrics_are_discoverable(routed):
    from test_observability import scrape, worker_metric_urls

    urls = worker_metric_urls(routed)
    assert len(urls["decode"]) == 2
    # The late router of the test before has stopped: only the deployment's own is listed.
    assert urls["router"] == [f"http://{router_status(routed).metrics_address}/metrics"]
    metrics = scrape(urls["router"][0])
    assert metrics[("llmq_router_decision_seconds_count", ())] > 0
    assert metrics[("llmq_router_num_events_applied_total", ())] > 0
    assert metrics[("llmq_router_index_size_blocks", ())] > 0
    assert 0 < metrics[("llmq_router_overlap_hit_rate", ())] < 1


def test_a_killed_worker_leaves_the_index_and_traffic_moves(routed):
    holder, _, _ = complete(routed, prompt(LAST, 0))
    wait_for(lambda: router_status(routed).index_blocks.get(holder, 0) > 0, 30, "the holder's blocks in the index")
    victim = next(w for w in live_status(routed) if w.worker_id == holder)
    os.kill(victim.pid, signal.SIGKILL)
    # Once its lease lapses the router drops its blocks...
    wait_for(lambda: holder not in router_status(routed).index_blocks, 30, "the dead worker's blocks to leave")
    # ...and the prefix goes to the survivor, which never held it.
    worker, overlap, _ = complete(routed, prompt(LAST, 1))
    assert worker != holder and overlap == 0
