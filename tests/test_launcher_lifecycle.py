"""The launcher's whole life, as `make serve` runs it: with no Redis answering it starts its own,
serves, and on Ctrl-C exits 0 leaving no process behind, its Redis included."""

from __future__ import annotations

import signal

import psutil
import pytest
import redis

from conftest import free_port, make_settings, start_deployment, wait_for

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"


def _alive(proc: psutil.Process) -> bool:
    # A zombie has exited; it only waits for its parent to read its exit code.
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _survivors(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if _alive(p)]


def test_launcher_starts_its_own_redis_serves_and_leaves_nothing_on_ctrl_c(model_path, tmp_path):
    redis_url = f"redis://127.0.0.1:{free_port()}/0"  # nothing answers here yet
    dep = start_deployment(make_settings(redis_url), tmp_path)
    descendants: list[psutil.Process] = []
    try:
        assert "started a local Redis" in dep.log()
        out = dep.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=3)
        assert out.usage.completion_tokens >= 1
        # Every process the launcher started, and theirs: Redis, gunicorn and its workers, the
        # Celery worker and its vLLM engine process.
        descendants = psutil.Process(dep.proc.pid).children(recursive=True)
        cmdlines = " ".join(" ".join(p.cmdline()) for p in descendants)
        assert "redis-server" in cmdlines and "gunicorn" in cmdlines and "celery" in cmdlines

        dep.proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends it
        assert dep.proc.wait(timeout=90) == 0, dep.log()[-4000:]
        try:
            wait_for(lambda: not _survivors(descendants), timeout_s=30,
                     what="every process the launcher started to exit")
        except TimeoutError:
            pytest.fail(f"left behind: {[(p.pid, p.name()) for p in _survivors(descendants)]}")
    finally:
        dep.stop()
        for p in _survivors(descendants):  # a failed test leaves no engine on a shared machine
            p.kill()
    # It stopped the Redis it had started, rather than leaving it running.
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()
