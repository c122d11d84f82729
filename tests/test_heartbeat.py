"""The worker's lease against a real Redis: a stopped worker is never listed again."""

from __future__ import annotations

import asyncio
import threading

import redis
import redis.asyncio as aioredis

from conftest import fresh_redis_url, wait_for
from tasks import keys
from tasks.registry import WorkerStatus, alive_workers, drop_lease, is_alive, live_workers, renew_lease
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


def _status(worker_id: str, role: str = "decode") -> WorkerStatus:
    return WorkerStatus(worker_id, role, [role], "h", 1, 0.0, 0.0)


def test_leases_are_listed_from_their_set_and_gone_ones_leave_it():
    # A database of its own: these assert on every lease listed.
    client = redis.Redis.from_url(fresh_redis_url())
    renew_lease(client, _status("a@test"), lease_s=60)
    renew_lease(client, _status("b@test", role="prefill"), lease_s=60)
    renew_lease(client, _status("c@test"), lease_s=60)
    client.delete(keys.worker_lease("c@test"))  # as the launcher does when a worker dies
    assert [w.worker_id for w in live_workers(client)] == ["a@test", "b@test"]
    assert [w.worker_id for w in live_workers(client, role="decode")] == ["a@test"]
    # The reader dropped the member of the deleted lease; the live ones stay.
    assert client.smembers(keys.WORKER_LEASES) == {keys.worker_lease("a@test").encode(),
                                                   keys.worker_lease("b@test").encode()}
    drop_lease(client, "a@test")
    assert client.smembers(keys.WORKER_LEASES) == {keys.worker_lease("b@test").encode()}
    renew_lease(client, _status("c@test"), lease_s=60)  # a worker back after its lease lapsed
    assert [w.worker_id for w in live_workers(client)] == ["b@test", "c@test"]


def test_an_expired_lease_is_not_listed():
    client = redis.Redis.from_url(fresh_redis_url())
    renew_lease(client, _status("brief@test"), lease_s=0.05)
    wait_for(lambda: not client.exists(keys.worker_lease("brief@test")), 5, "the lease to expire")
    assert live_workers(client) == []
    assert not client.exists(keys.WORKER_LEASES)  # its last member dropped, the set went with it


def test_the_async_reader_lists_the_same():
    url = fresh_redis_url()
    renew_lease(redis.Redis.from_url(url), _status("p@test", role="prefill"), lease_s=60)

    async def read():
        client = aioredis.Redis.from_url(url)
        try:
            return await alive_workers(client, role="prefill"), await alive_workers(client, role="decode")
        finally:
            await client.aclose()

    prefill, decode = asyncio.run(read())
    assert [w.worker_id for w in prefill] == ["p@test"] and decode == []
