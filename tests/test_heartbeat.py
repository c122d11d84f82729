"""The worker's lease against a real Redis: a stopped worker is never listed again."""

from __future__ import annotations

import threading

import redis

from tasks import keys
from tasks.registry import is_alive
from workers.heartbeat import Heartbeat


class HangingSecondBeat:
    """A hook for a Heartbeat: the first beat (start's) is quick, the thread's first beat hangs
    in it until `release` is set."""

    def __init__(self, returns=None):
        self.returns = returns
        self.beats = 0
        self.in_beat, self.release = threading.Event(), threading.Event()

    def __call__(self):
        self.beats += 1
        if self.beats == 2:
            self.in_beat.set()
            self.release.wait(10)
        return self.returns


def test_a_beat_slower_than_stop_does_not_bring_the_lease_back(scratch_redis_url):
    client = redis.Redis.from_url(scratch_redis_url)
    # Hanging in load, before the renewal: as when its figures wait on a busy lock.
    hang = HangingSecondBeat(returns={})
    beat = Heartbeat(client, "slow@test", "router", ["router"], interval_s=0.05, lease_s=5, load=hang)
    beat.start()
    assert is_alive(client, "slow@test")
    assert hang.in_beat.wait(10)
    beat.stop()  # its join gives up on the hanging beat, and it drops the lease
    assert not is_alive(client, "slow@test")
    hang.release.set()
    beat._thread.join(timeout=10)
    assert not beat._thread.is_alive()
    assert not is_alive(client, "slow@test")


def test_a_beat_stuck_inside_renewal_does_not_hold_up_stop(scratch_redis_url, caplog):
    client = redis.Redis.from_url(scratch_redis_url)
    # Hanging in on_beat, inside the renewal: as a renewal on a hung Redis would.
    hang = HangingSecondBeat()
    beat = Heartbeat(client, "stuck@test", "router", ["router"], interval_s=0.05, lease_s=5, load=dict,
                     on_beat=hang)
    beat.start()
    assert hang.in_beat.wait(10)
    stopper = threading.Thread(target=beat.stop)
    stopper.start()
    stopper.join(timeout=5)
    hang.release.set()
    assert not stopper.is_alive()  # it gave up on the stuck beat instead of waiting for it
    assert "is stuck" in caplog.text
    beat._thread.join(timeout=10)
    client.delete(keys.worker_lease("stuck@test"))
