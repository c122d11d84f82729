"""Which decode workers the router may choose: those with a lease in Redis."""

from __future__ import annotations

import logging
import time

import redis

from router.index import SharedIndex
from router.policy import Bookings, RecentDecisions
from tasks.registry import WorkerStatus, live_workers

logger = logging.getLogger(__name__)

# Worker leases are re-read at most this often.
LEASE_CACHE_S = 0.25


class Membership:
    """The live decode workers, as of the last read of their leases."""

    def __init__(self, client: redis.Redis, shared: SharedIndex, bookings: Bookings, recent: RecentDecisions):
        self.redis = client
        self.shared = shared
        self.bookings = bookings
        self.recent = recent
        self._workers: dict[str, WorkerStatus] = {}
        self._read_at = 0.0

    @property
    def workers(self) -> dict[str, WorkerStatus]:
        """The live workers as of the last refresh. Reads nothing and changes nothing."""
        return self._workers

    def refresh(self, fresh: bool = False) -> dict[str, WorkerStatus]:
        """Re-reads the leases if the last read is older than LEASE_CACHE_S (always if ``fresh``),
        and acts on them: a worker whose lease is gone is evicted (its blocks leave the index, its
        bookings and recent decisions are forgotten), and the bookings that a worker's newest
        report covers are settled. Returns the live workers."""
        now = time.monotonic()
        if fresh or now - self._read_at > LEASE_CACHE_S:
            current = {w.worker_id: w for w in live_workers(self.redis, role="decode")}
            with self.shared.lock:
                for gone in (set(self._workers) | self.shared.index.workers()) - set(current):
                    dropped = self.shared.index.clear(gone)
                    self.bookings.forget(gone)
                    self.recent.forget(gone)
                    logger.warning("worker %s left (lease expired); dropped its %d blocks", gone, dropped)
                for status in current.values():
                    self.bookings.settle(status.worker_id, status.updated_unix)
                self._workers = current
            self._read_at = now
        return self._workers
