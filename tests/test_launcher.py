"""The launcher's `with-redis`, which `make test` runs the suite under. Which engines it pins to
which core is tested with the rest of the placement (test_placement.py)."""

import subprocess
import sys

import pytest
import redis

from conftest import ROOT, free_port


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


def test_with_a_password_the_launchers_redis_requires_it_and_no_line_shows_it():
    port = free_port()
    url = f"redis://:hunter2-launch@127.0.0.1:{port}/0"
    check = ("import redis, sys\n"
             f"redis.Redis.from_url({url!r}).ping()\n"
             "try:\n"
             f"    redis.Redis(port={port}).ping()\n"
             "except redis.AuthenticationError:\n"
             "    sys.exit(0)\n"
             "sys.exit(1)\n")
    done = subprocess.run([sys.executable, "-m", "launcher", "with-redis", url, "--", sys.executable, "-c", check],
                          cwd=ROOT, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stdout.decode()[-2000:]
    assert b"started a local Redis at redis://:***@127.0.0.1" in done.stdout
    assert b"hunter2-launch" not in done.stdout + done.stderr
    assert not list((ROOT / "run").glob(f"redis-{port}-*.conf"))  # the requirepass file went with it
