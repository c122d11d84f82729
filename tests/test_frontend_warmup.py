"""The frontend pays its first-use costs before it serves, not inside its first requests."""

import os
import subprocess
import sys
import threading
import time

import pytest
import redis

from app import create_app
from conftest import ROOT, make_settings


def test_every_thread_shares_the_result_backend_built_before_the_fork(model_path, scratch_redis_url):
    # Celery builds a backend per thread unless told it is thread-safe, and building one scans
    # every installed package's entry points; in the frontend that was 0.1-1 s in each thread's
    # first request (tasks/celery_app.py).
    gateway = create_app(make_settings(scratch_redis_url)).extensions["llmq.gateway"]
    built = gateway.celery._backend  # what Gateway.prepare built in create_app (gunicorn's master)
    assert built is not None
    seen = []
    thread = threading.Thread(target=lambda: seen.append(gateway.celery.backend))
    thread.start()
    thread.join(timeout=10)
    assert seen == [built]


@pytest.mark.parametrize("publish", ["direct", "celery"])
def test_a_process_connects_before_its_first_request(model_path, scratch_redis_url, publish):
    gateway = create_app(make_settings(scratch_redis_url, **{"frontend.publish": publish})).extensions["llmq.gateway"]
    db = gateway.redis.connection_pool.connection_kwargs["db"]

    probe = redis.Redis.from_url(scratch_redis_url)  # one connection, in both lists

    def clients() -> set[str]:
        # By id: other tests' clients of this database may close meanwhile, so a count can fall.
        return {c["id"] for c in probe.client_list() if int(c["db"]) == db}

    before = clients()
    gateway.connect()
    # Its Redis connection, its stream reader's, and, publishing through Celery, a full pool of
    # broker connections are open (a burst opening them queued its threads for over a second),
    # and the liveness cache is filled. Publishing direct uses the Redis connection alone.
    producers = gateway.celery.producer_pool.limit if publish == "celery" else 0
    # The reader's thread opens its connection on its first read, just after connect() returns.
    deadline = time.monotonic() + 10
    while len(clients() - before) < 2 + producers and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(clients() - before) >= 2 + producers
    assert gateway.streams.wake_key and gateway.redis.exists(gateway.streams.wake_key)
    assert gateway._live_read_at > 0


@pytest.mark.parametrize("freeze", [True, False])
def test_gunicorn_master_freezes_its_heap_before_each_fork(freeze):
    # Without it each worker's first full collection copies the whole preloaded heap inside the
    # first burst (placement.PreforkFreeze). The hooks, run as gunicorn runs them.
    probe = ("import gc; import app.gunicorn_conf as c; a = gc.isenabled(); c.pre_fork(None, None); "
             "b = gc.get_freeze_count() > 0; c.post_fork(None, None); print(a, b, gc.isenabled())")
    env = dict(os.environ, LLMQ__FRONTEND__GC_FREEZE=str(freeze).lower())
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    # Collections off in the master, its heap frozen at the fork, on again in the worker.
    assert out == (["False", "True", "True"] if freeze else ["True", "False", "True"])
