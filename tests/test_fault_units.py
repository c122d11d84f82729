"""The pure parts of issue 12's fault handling, without engines: the launcher's notice of a dead
worker, the lease gate on Celery's consumer, the 503 for a Redis outage, engine processes dying
with their parent, and the router's resync to a new KV event stream."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
from types import SimpleNamespace

import psutil
import pytest
import redis
from celery import bootsteps
from flask import Flask
from kombu.exceptions import OperationalError

from app.errors import register_error_handlers
from config import Settings
from conftest import ROOT, free_port, wait_for
from launcher.__main__ import lease_dropper, worker_id
from launcher.supervisor import Child, Supervisor
from tasks import consuming, keys
from tasks.messages import KvEvent, encode_kv_event
from tasks.registry import WorkerStatus, is_alive, renew_lease
from workers.heartbeat import Heartbeat

# -- the launcher ------------------------------------------------------------------------------


def test_the_supervisor_tells_of_an_exited_child_before_it_restarts_it():
    seen: list[tuple[str, int | None]] = []
    supervisor = Supervisor({}, grace_s=5)

    def on_exit(child: Child) -> None:
        seen.append((child.name, child.proc.returncode if child.proc else None))
        supervisor.stop_all()  # one notice is enough; stop_all ends wait()

    supervisor.on_exit = on_exit
    supervisor.start(Child("decode0", [sys.executable, "-c", "import sys; sys.exit(3)"], stop_order=3))
    waiter = threading.Thread(target=supervisor.wait)
    waiter.start()
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    assert seen == [("decode0", 3)]


def test_the_worker_id_is_celerys_name_at_host():
    assert worker_id("decode1") == f"decode1@{socket.gethostname()}"


def test_the_launcher_drops_a_dead_workers_lease_and_nobody_elses(scratch_redis_url):
    client = redis.Redis.from_url(scratch_redis_url)
    for name in ("decode0", "router0"):
        renew_lease(client, WorkerStatus(worker_id(name), "decode", [], "h", 1, 0.0, 0.0), lease_s=60)
    on_exit = lease_dropper(Settings(redis_url=scratch_redis_url))
    on_exit(Child("decode0", ["true"], stop_order=3))
    on_exit(Child("frontend", ["true"], stop_order=1))  # not a worker: nothing to drop
    assert not is_alive(client, worker_id("decode0"))
    assert is_alive(client, worker_id("router0"))
    client.delete(keys.worker_lease(worker_id("router0")))


def test_dropping_a_lease_with_redis_down_is_not_fatal(caplog):
    on_exit = lease_dropper(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))  # nothing listens there
    on_exit(Child("decode0", ["true"], stop_order=3))
    assert "lapses on its own" in caplog.text


# -- the lease follows Celery's consumer ---------------------------------------------------------


@pytest.fixture
def consumer_state():
    yield
    consuming._consuming = None


def _consumer(state: int) -> SimpleNamespace:
    return SimpleNamespace(blueprint=SimpleNamespace(state=state))


def test_consuming_follows_the_consumers_restarts_not_its_shutdown(consumer_state):
    step = consuming.ConsumingStep.__new__(consuming.ConsumingStep)
    assert consuming.consuming()  # no consumer in this process: nothing to wait for
    step.start(_consumer(bootsteps.RUN))
    assert consuming.consuming()
    step.stop(_consumer(bootsteps.RUN))  # a restart after the broker connection was lost
    assert not consuming.consuming()
    step.start(_consumer(bootsteps.RUN))  # reconnected: consuming again
    assert consuming.consuming()
    step.stop(_consumer(bootsteps.CLOSE))  # a warm shutdown keeps the lease while tasks finish
    assert consuming.consuming()


def test_the_celery_app_carries_the_consuming_step():
    from config import load_settings
    from tasks.celery_app import make_celery

    app = make_celery(load_settings(ROOT / "configs" / "agg.yaml", environ={}))
    assert consuming.ConsumingStep in app.steps["consumer"]


def test_workers_send_task_events_only_where_flower_reads_them():
    from config import load_settings
    from tasks.celery_app import make_celery

    with_flower = make_celery(load_settings(ROOT / "configs" / "agg.yaml", environ={}))
    assert with_flower.conf.worker_send_task_events and with_flower.conf.task_send_sent_event
    without = make_celery(load_settings(ROOT / "configs" / "agg.yaml", ["flower.enabled=false"], environ={}))
    assert not without.conf.worker_send_task_events and not without.conf.task_send_sent_event


def test_a_worker_holds_a_lease_only_while_it_consumes(scratch_redis_url):
    client = redis.Redis.from_url(scratch_redis_url)
    serving = threading.Event()
    serving.set()
    beat = Heartbeat(client, "gated@test", "decode", ["decode"], interval_s=60, lease_s=60, load=dict,
                     serving=serving.is_set)
    beat.beat()
    assert is_alive(client, "gated@test")
    serving.clear()
    beat.beat()  # the consumer is reconnecting: tasks sent now would wait, so no lease
    assert not is_alive(client, "gated@test")
    serving.set()
    beat.beat()
    assert is_alive(client, "gated@test")
    beat.stop()
    assert not is_alive(client, "gated@test")


# -- the frontend while Redis is down -----------------------------------------------------------


@pytest.mark.parametrize("error", [redis.ConnectionError("Connection refused"),
                                   OperationalError("Error 111 connecting to 127.0.0.1:1. Connection refused.")])
def test_a_redis_outage_is_a_503_with_retry_after_not_the_catch_all(error, caplog):
    app = Flask(__name__)
    register_error_handlers(app)

    @app.post("/v1/completions")
    def fails():
        raise error

    reply = app.test_client().post("/v1/completions", json={})
    assert reply.status_code == 503
    assert reply.headers["Retry-After"].isdigit()
    body = reply.get_json()["error"]
    assert body["type"] == "service_unavailable"
    assert "Redis" in body["message"]
    assert set(body) == {"message", "type", "param", "code"}
    assert "unhandled error" not in caplog.text


# -- engine processes die with their worker -----------------------------------------------------

# A parent that installs the hook and starts a child from a thread other than its main one, which
# lives on (as the worker's engine-loop thread starts EngineCore); the child starts a grandchild
# from its main thread (as EngineCore starts VLLM::Worker). Then the parent dies without any
# cleanup. vLLM's CPU platform spawns them; the fork method is covered too.
_FAMILY = textwrap.dedent("""
    import multiprocessing, sys, threading, time

    def child(method):
        multiprocessing.get_context(method).Process(target=time.sleep, args=(120,), daemon=False).start()
        time.sleep(120)

    def start_child(method):
        multiprocessing.get_context(method).Process(target=child, args=(method,), daemon=False).start()
        time.sleep(120)

    if __name__ == "__main__":
        from workers import orphans
        assert orphans.install()
        threading.Thread(target=start_child, args=(sys.argv[1],)).start()
        time.sleep(120)
""")


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _sleepers(children: list[psutil.Process]) -> list[psutil.Process]:
    """The child and the grandchild, not multiprocessing's resource tracker."""
    return [p for p in children if "resource_tracker" not in " ".join(p.cmdline())]


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_children_die_with_the_process_that_started_them(method, tmp_path):
    script = tmp_path / "family.py"
    script.write_text(_FAMILY)
    parent = subprocess.Popen([sys.executable, str(script), method], cwd=ROOT, start_new_session=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    family: list[psutil.Process] = []
    try:
        me = psutil.Process(parent.pid)
        family = wait_for(lambda: (lambda c: c if len(c) == 2 else None)(_sleepers(me.children(recursive=True))),
                          60, "the child and the grandchild")
        assert all(_alive(p) for p in family)
        parent.kill()
        parent.wait(timeout=10)
        wait_for(lambda: not any(_alive(p) for p in family), 10, "the child and the grandchild to die with it")
    finally:
        parent.kill()
        for p in family:
            if _alive(p):
                p.kill()


# -- the router after Redis lost its data ------------------------------------------------------


def test_a_router_reads_a_new_event_stream_that_starts_below_its_cursor(scratch_redis_url, caplog):
    from config import load_settings
    from router.service import RouterService

    client = redis.Redis.from_url(scratch_redis_url)
    client.delete(keys.KV_EVENTS, keys.KV_INDEX_SNAPSHOT)
    settings = load_settings(ROOT / "configs" / "agg_router.yaml", ["router.snapshot_every_events=0"], environ={})
    service = RouterService(settings, client)
    block = [7] * service.index.block_size

    def store(entry_id: str, block_hash: bytes) -> None:
        client.xadd(keys.KV_EVENTS, {"e": encode_kv_event(KvEvent("decode0@a", "stored", [block_hash], None,
                                                                   block))}, id=entry_id)

    try:
        store("5000-0", b"old")
        assert service.events.catch_up() == 1
        assert service.events.resync() is False  # the stream it read is still there
        # Redis restarted empty, and the new stream's ids start below the old cursor.
        client.delete(keys.KV_EVENTS)
        store("10-0", b"new")
        assert service.events.catch_up() == 0  # stuck behind its old cursor...
        assert service.events.resync() is True  # ...until it resyncs after the outage
        assert "KV event stream is gone or new" in caplog.text
        assert service.events.catch_up() == 1
        assert service.events.resync() is False
        client.delete(keys.KV_EVENTS)
        assert service.events.resync() is True  # no stream at all: start from the beginning
        assert service.shared.cursor == "0-0"
    finally:
        client.delete(keys.KV_EVENTS, keys.KV_INDEX_SNAPSHOT)
