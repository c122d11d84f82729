"""Issue 12's process and Redis faults, against real processes: the launcher's own Redis killed
and back, a frontend whose Redis is down, and a worker's main process SIGKILLed, with and without
the launcher, leaving no engine process behind.

Every test here kills a Redis, so each runs its own redis-server on a free port: never the shared
one the rest of the suite uses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from config import dump_settings
from conftest import ROOT, Deployment, free_port, make_settings, start_deployment, wait_for
from tasks.registry import is_alive, live_workers

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _engine_processes(pid: int) -> list[psutil.Process]:
    """Every process below a worker's main process: vLLM's EngineCore and Worker, and theirs."""
    return psutil.Process(pid).children(recursive=True)


def _is_engine(p: psutil.Process) -> bool:
    try:
        return "VLLM" in " ".join(p.cmdline()) or "VLLM" in p.name()
    except psutil.NoSuchProcess:
        return False


def _health(port: int) -> tuple[int, dict, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as reply:
            return reply.status, json.load(reply), dict(reply.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def _post(dep: Deployment, path: str, body: dict) -> tuple[int, dict, dict, float]:
    started = time.monotonic()
    request = urllib.request.Request(dep.base_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.load(reply), dict(reply.headers), time.monotonic() - started
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers), time.monotonic() - started


def _complete(dep: Deployment) -> int:
    out = dep.client(timeout=60).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                         max_tokens=4)
    return out.usage.completion_tokens


class RedisServer:
    """A redis-server of the test's own, on a free port, that a test may kill and start again."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        server = shutil.which("redis-server")
        assert server, "redis-server is not installed"
        self.proc = subprocess.Popen([server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=(self.tmp / "redis.log").open("ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self.answers, 15, "redis-server to answer")

    def answers(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


# -- the launcher's own Redis, killed and back -------------------------------------------------


@pytest.fixture(scope="module")
def own_redis_deployment(model_path, tmp_path_factory) -> Iterator[Deployment]:
    """A routed deployment (a router and one decode worker) whose Redis the launcher started: nothing
    answers at its URL when it starts."""
    redis_url = f"redis://127.0.0.1:{free_port()}/0"
    settings = make_settings(redis_url, base="agg_router.yaml", **{"workers.num_decode": 1})
    dep = start_deployment(settings, tmp_path_factory.mktemp("own_redis"))
    yield dep
    dep.stop()


def _launcher_children(dep: Deployment) -> set[int]:
    """The pids of the launcher's direct children."""
    return {p.pid for p in psutil.Process(dep.proc.pid).children() if _alive(p)}


def _redis_child(dep: Deployment) -> psutil.Process | None:
    # redis-server retitles itself "redis-server 127.0.0.1:PORT".
    port = dep.settings.redis_url.rsplit(":", 1)[1].split("/")[0]
    for p in psutil.Process(dep.proc.pid).children():
        try:
            cmdline = " ".join(p.cmdline())
        except psutil.NoSuchProcess:  # a zombie too: the killed server, dead since children()
            continue
        if _alive(p) and "redis-server" in cmdline and f":{port}" in cmdline:
            return p
    return None


def test_the_launchers_redis_killed_comes_back_and_the_deployment_serves_with_nothing_else_restarted(
        own_redis_deployment):
    dep = own_redis_deployment
    assert "started a local Redis" in dep.log()
    assert _complete(dep) >= 1
    redis_server = _redis_child(dep)
    assert redis_server is not None
    others = _launcher_children(dep) - {redis_server.pid}
    workers_before = {w.worker_id: w.pid for w in live_workers(dep.redis)}
    assert len(workers_before) == 2 and set(workers_before.values()) <= others  # a router and a decode worker

    redis_server.kill()
    killed_at = time.monotonic()
    back = wait_for(lambda: _redis_child(dep) if _redis_child(dep) and _redis_child(dep).pid != redis_server.pid
                    else None, 30, "the launcher to start its Redis again")
    wait_for(lambda: dep.redis.ping(), 15, "the new Redis to answer")
    redis_back_s = time.monotonic() - killed_at
    # /health says ok only once every worker consumes again and has put its lease back.
    wait_for(lambda: _health(dep.settings.frontend.port)[0] == 200, 60, "/health to say ok again", interval_s=0.1)
    healthy_s = time.monotonic() - killed_at
    assert _complete(dep) >= 1
    served_s = time.monotonic() - killed_at
    print(f"\nRedis SIGKILLed -> restarted {redis_back_s:.2f}s, /health ok {healthy_s:.2f}s, "
          f"a completion answered {served_s:.2f}s")

    assert "redis exited with code -9; restarting it" in dep.log()
    # Started the same way: one command line in the log, for the first start and the restart.
    assert dep.log().count("starting redis: ") == 1
    # Nothing else was restarted: the same processes, holding the same leases again.
    assert _launcher_children(dep) - {back.pid} == others
    assert {w.worker_id: w.pid for w in live_workers(dep.redis)} == workers_before


def test_a_killed_worker_loses_its_lease_at_once_and_leaves_no_engine_process(own_redis_deployment):
    dep = own_redis_deployment
    worker = wait_for(lambda: next(iter(live_workers(dep.redis, role="decode")), None), 60, "a decode worker")
    engine = _engine_processes(worker.pid)
    assert any(_is_engine(p) for p in engine), [p.cmdline() for p in engine]

    os.kill(worker.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: not is_alive(dep.redis, worker.worker_id), 10, "the dead worker's lease to go", interval_s=0.05)
    lease_gone_s = time.monotonic() - killed_at
    wait_for(lambda: not any(_alive(p) for p in engine), 10, "the worker's engine processes to die")
    print(f"\nworker SIGKILLed -> lease dropped {lease_gone_s:.2f}s")
    # The launcher dropped it, not the lease's expiry (workers.lease_s is 6 s here).
    assert lease_gone_s < dep.settings.workers.lease_s
    assert f"{worker.worker_id} exited; dropped its lease" in dep.log()
    # And it starts the worker again.
    wait_for(lambda: any(w.pid != worker.pid for w in live_workers(dep.redis, role="decode")), 240,
             "the restarted worker")


# -- a worker without the launcher ---------------------------------------------------------------


def test_a_plain_celery_worker_killed_leaves_no_engine_process(own_redis, model_path, tmp_path):
    """`celery -A tasks worker -Q decode` as a user runs it, with no launcher to clean up."""
    url = f"{own_redis.url}/1"
    cfg = tmp_path / "config.yaml"
    dump_settings(make_settings(url), cfg)
    client = redis.Redis.from_url(url)
    client.flushdb()
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", "decode", "-n",
                               "plain@%h", "--loglevel", "INFO"], cwd=ROOT, env=dict(os.environ, LLMQ_CONFIG=str(cfg)),
                              stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    engine: list[psutil.Process] = []
    try:
        wait_for(lambda: live_workers(client, role="decode") or worker.poll() is not None, 240, "the worker's lease")
        assert worker.poll() is None, log.read_text()[-3000:]
        engine = _engine_processes(worker.pid)
        assert any(_is_engine(p) for p in engine), [p.cmdline() for p in engine]

        worker.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        worker.wait(timeout=10)
        try:
            wait_for(lambda: not any(_alive(p) for p in engine), 10, "the engine processes to die with the worker",
                     interval_s=0.05)
        except TimeoutError:
            pytest.fail(f"left behind: {[(p.pid, p.cmdline()) for p in engine if _alive(p)]}")
        print(f"\nplain worker SIGKILLed -> its {len(engine)} processes gone {time.monotonic() - killed_at:.2f}s")
    finally:
        worker.kill()
        for p in engine:  # a failed test leaves no engine on a shared machine
            if _alive(p):
                p.kill()
        client.flushdb()


# -- while Redis is down ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frontend_on_own_redis(own_redis, model_path, tmp_path_factory) -> Iterator[Deployment]:
    """A frontend alone (no workers, no engine), on the module's Redis, which the test stops."""
    dep = start_deployment(make_settings(f"{own_redis.url}/2"), tmp_path_factory.mktemp("frontend"),
                           roles="frontend")
    yield dep
    dep.stop()


def test_while_redis_is_down_every_request_gets_a_fast_503_with_retry_after(own_redis, frontend_on_own_redis):
    dep = frontend_on_own_redis
    port = dep.settings.frontend.port
    status, body, _ = _health(port)
    assert status == 503 and "no live decode worker" in body["reason"]  # up, with no worker

    own_redis.kill()
    try:
        requests = [
            ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
            ("/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}),
            ("/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3}),
            ("/completions", {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 3}),
        ]
        for path, request in requests * 2:  # the second round on connections the first found dead
            status, reply, headers, took_s = _post(dep, path, request)
            assert status == 503, (path, reply)
            assert reply["error"]["type"] == "service_unavailable"
            assert "Redis" in reply["error"]["message"]
            assert set(reply["error"]) == {"message", "type", "param", "code"}
            assert headers.get("Retry-After", "").isdigit()
            assert took_s < 5, f"{path} took {took_s:.1f}s"
        status, body, headers = _health(port)
        assert status == 503 and "Redis" in body["reason"]
        assert headers.get("Retry-After", "").isdigit()
    finally:
        own_redis.start()
    assert "unhandled error" not in dep.log()
    # Redis back on the same port: the frontend reconnects by itself.
    wait_for(lambda: "no live decode worker" in _health(port)[1].get("reason", ""), 30, "the frontend to reconnect")
