"""Shared fixtures. Integration tests use real Redis, real gunicorn, real Celery workers with real
vLLM engines on the tiny model, and the official openai client. Each deployment gets its own
Redis database so tests never see each other's keys or queues."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from config import Settings, default_model_cache, load_settings

ROOT = Path(__file__).resolve().parent.parent

REDIS_BASE = os.environ.get("LLMQ_TEST_REDIS", "redis://127.0.0.1:6379")
# Databases 6-15 belong to the tests (the benchmarks take 1-5, bench/deploy.py; `make serve` 0).
# The two that live for the whole session have their own: 6 the bare one (scratch_redis_url), 7
# the shared deployment's. Every other deployment takes the next of 8-15, round and round: a
# database comes round again only after seven other deployments, long after its own stopped (none
# outlives its module), and it is flushed before its reuse.
SCRATCH_DB, SHARED_DB = 6, 7
_next_db = itertools.cycle(range(SHARED_DB + 1, 16))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@pytest.fixture(scope="session")
def model_path() -> str:
    from scripts.build_tiny_model import is_complete

    path = default_model_cache() / "tiny-llama"
    if not is_complete(path):
        subprocess.run([sys.executable, str(ROOT / "scripts" / "build_tiny_model.py")], check=True)
    return str(path)


def fresh_redis_url(db: int | None = None) -> str:
    url = f"{REDIS_BASE}/{next(_next_db) if db is None else db}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="session")
def scratch_redis_url() -> str:
    """One database for the tests that need a bare Redis and no deployment, whose keys do not
    overlap: the suite has only 10 databases, and every deployment fixture takes one."""
    return fresh_redis_url(SCRATCH_DB)


def make_settings(redis_url: str, base: str = "agg.yaml", **sections) -> Settings:
    overrides = [
        f"redis_url={redis_url}",
        f"frontend.port={free_port()}",
        "frontend.first_token_timeout_s=60",
        "frontend.request_timeout_s=120",
        "engine.kv_cache_gib=0.125",
        "flower.enabled=false",
        # Short enough that a killed worker leaves within seconds, long enough that a worker on a
        # loaded 2-core machine does not lose its lease between two beats.
        "workers.heartbeat_interval_s=1",
        "workers.lease_s=6",
    ] + [f"{k}={v}" for k, v in sections.items()]
    return load_settings(ROOT / "configs" / base, overrides, environ={})


@dataclass
class Deployment:
    settings: Settings
    proc: subprocess.Popen
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.frontend.port}/v1"

    @property
    def redis(self) -> redis.Redis:
        from tasks import redis_conn

        return redis_conn.client(self.settings)

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=self.settings.frontend.api_key or "none",
                             max_retries=0, timeout=kwargs.pop("timeout", 120), **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return self.proc.returncode


def start_deployment(settings: Settings, tmp: Path, roles: str = "", ready_timeout_s: float = 240) -> Deployment:
    """Runs the real launcher (`python -m launcher serve`) and waits until it says ready."""
    from config import dump_settings

    cfg = tmp / "config.yaml"
    dump_settings(settings, cfg)
    log_path = tmp / "deployment.log"
    argv = [sys.executable, "-m", "launcher", "serve", "-f", str(cfg), "--grace-s", "20"]
    if roles:
        argv += ["--roles", roles]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ__") and k not in ("REDIS_URL", "PORT")}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    dep = Deployment(settings, proc, log_path)
    marker = "ready: http" if "frontend" in (roles or "frontend") else None
    try:
        if marker:
            wait_for(lambda: marker in dep.log() or proc.poll() is not None, ready_timeout_s, "deployment ready")
            if proc.poll() is not None:
                raise RuntimeError(f"deployment exited early:\n{dep.log()[-4000:]}")
    except BaseException:
        dep.stop()
        raise
    return dep


@pytest.fixture(scope="session")
def deployment(model_path, tmp_path_factory) -> Iterator[Deployment]:
    """The aggregated deployment most integration tests share: frontend + one decode worker, with
    the tiny model's tool parser for tool_choice "auto" (tests/test_structured_api.py)."""
    settings = make_settings(fresh_redis_url(SHARED_DB), **{"model.tool_call_parser": "llama3_json",
                                                   "engine.structured_outputs_disable_any_whitespace": "true"})
    dep = start_deployment(settings, tmp_path_factory.mktemp("agg"))
    yield dep
    dep.stop()


def sigkill_worker(pid: int) -> None:
    """SIGKILLs a worker's main process. Its engine processes die with it (workers/orphans.py);
    they are killed here too, collected before the kill, so that tests/test_faults.py alone
    speaks for the orphan fix and a slow parent-death signal cannot hold the CPU a test needs."""
    import psutil

    engines = psutil.Process(pid).children(recursive=True)
    os.kill(pid, signal.SIGKILL)
    for proc in engines:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def live_status(dep: Deployment, role: str = "decode"):
    from tasks.registry import live_workers

    return live_workers(dep.redis, role=role)


def stored_blocks(dep: Deployment, worker: str) -> int:
    """Blocks the worker's engine reported storing, read off the KV event stream routers replay."""
    from tasks import keys
    from tasks.messages import decode_kv_event

    events = [decode_kv_event(fields[b"e"]) for _, fields in dep.redis.xrange(keys.KV_EVENTS)]
    return sum(len(e.block_hashes) for e in events if e.worker_id == worker and e.kind == "stored")
