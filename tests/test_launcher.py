"""The launcher's pure parts (which engines it pins to which core), and `with-redis`, which
`make test` runs the suite under."""

import subprocess
import sys

import pytest
import redis

from conftest import ROOT, free_port
from launcher.__main__ import engine_cores


def test_several_engines_get_a_core_each_round_robin(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    envs = engine_cores(3, "auto")
    assert [e["VLLM_CPU_OMP_THREADS_BIND"] for e in envs] == ["0", "1", "0"]


def test_engines_that_move_kv_are_left_unpinned():
    # They unpin themselves (workers/engine.py); the launcher must not pin them first.
    assert engine_cores(2, "auto", moves_kv=True) == [{}, {}]


def test_one_engine_or_an_explicit_binding_is_left_to_vllm_and_the_config():
    assert engine_cores(1, "auto") == [{}]
    assert engine_cores(2, "0-1") == [{}, {}]


def test_with_redis_starts_one_for_the_command_and_stops_it_after():
    url = f"redis://127.0.0.1:{free_port()}"
    ping = f"import redis, sys; sys.exit(0 if redis.Redis.from_url({url!r}).ping() else 1)"
    done = subprocess.run([sys.executable, "-m", "launcher", "with-redis", url, "--", sys.executable, "-c", ping],
                          cwd=ROOT, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stdout.decode()[-2000:]
    assert b"started a local Redis" in done.stdout
    # The command returned, so the Redis it was given is gone: nothing answers there any more.
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
