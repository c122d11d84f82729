"""A worker's role follows from the queues it consumes; its lease goes up when it consumes."""

import os
import signal
import subprocess
import sys

import pytest
import redis

from config import dump_settings
from conftest import ROOT, make_settings, wait_for
from tasks import keys
from tasks.queues import role_for
from tasks.registry import live_workers


def test_roles_from_queues():
    assert role_for(["decode"]) == "decode"
    assert role_for(["prefill"]) == "prefill"
    assert role_for(["router"]) == "router"


def test_one_engine_per_worker():
    with pytest.raises(ValueError, match="one engine"):
        role_for(["decode", "prefill"])


def test_unknown_queue_is_named():
    with pytest.raises(ValueError, match="decod"):
        role_for(["decod"])


def test_a_router_stopped_as_soon_as_it_is_listed_leaves_no_lease(scratch_redis_url, tmp_path):
    # Its lease goes up once Celery consumes, when Celery's SIGTERM handler is in place; put up
    # earlier, a SIGTERM in between killed the worker outright and left the lease behind.
    cfg = tmp_path / "config.yaml"
    dump_settings(make_settings(scratch_redis_url, base="agg_router.yaml"), cfg)
    client = redis.Redis.from_url(scratch_redis_url)
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", "router", "-n",
                               "router7@%h", "--loglevel", "INFO"], cwd=ROOT,
                              env=dict(os.environ, LLMQ_CONFIG=str(cfg)), stdout=subprocess.DEVNULL,
                              stderr=(tmp_path / "router.log").open("w"))
    try:
        listed = wait_for(lambda: next((w for w in live_workers(client, role="router")
                                        if w.worker_id.startswith("router7@")), None), 60, "the router's lease",
                          interval_s=0.01)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0, (tmp_path / "router.log").read_text()[-2000:]
    finally:
        worker.kill()
    assert not client.exists(keys.worker_lease(listed.worker_id))
