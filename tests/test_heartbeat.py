"""The worker's lease against a real Redis: a stopped worker is never listed again."""

from __future__ import annotations

import threading

import redis

from tasks import keys
from tasks.registry import is_alive
from workers.heartbeat import Heartbeat


def test_a_beat_slower_than_stop_does_not_bring_the_lease_back(scratch_redis_url):
    client = redis.Redis.from_url(scratch_redis_url)
    in_beat, release = threading.Event(), threading.Event()
    beats = 0

    def load() -> dict:
        # The first beat (start's) is quick; the thread's first beat hangs until released,
        # as one does when its figures wait on a busy lock.
        nonlocal beats
        beats += 1
        if beats == 2:
            in_beat.set()
            release.wait(10)
        return {}

    beat = Heartbeat(client, "slow@test", "router", ["router"], interval_s=0.05, lease_s=5, load=load)
    beat.start()
    assert is_alive(client, "slow@test")
    assert in_beat.wait(10)
    beat.stop()  # its join gives up on the hanging beat, and it drops the lease
    assert not is_alive(client, "slow@test")
    release.set()
    beat._thread.join(timeout=10)
    assert not beat._thread.is_alive()
    assert not is_alive(client, "slow@test")


def test_a_beat_stuck_inside_renewal_does_not_hold_up_stop(scratch_redis_url, caplog):
    client = redis.Redis.from_url(scratch_redis_url)
    in_beat, release = threading.Event(), threading.Event()
    beats = 0

    def on_beat() -> None:
        # Runs while the beat holds the renewal lock, as a renewal on a hung Redis would.
        nonlocal beats
        beats += 1
        if beats == 2:
            in_beat.set()
            release.wait(10)

    beat = Heartbeat(client, "stuck@test", "router", ["router"], interval_s=0.05, lease_s=5, load=dict,
                     on_beat=on_beat)
    beat.start()
    assert in_beat.wait(10)
    stopper = threading.Thread(target=beat.stop)
    stopper.start()
    stopper.join(timeout=5)
    release.set()
    assert not stopper.is_alive()  # it gave up on the stuck beat instead of waiting for it
    assert "is stuck" in caplog.text
    beat._thread.join(timeout=10)
    client.delete(keys.worker_lease("stuck@test"))
