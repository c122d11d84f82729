"""Renews this worker's lease in Redis with its current load, on a steady interval."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from tasks import consuming
from tasks.registry import WorkerStatus, drop_lease, renew_lease

logger = logging.getLogger(__name__)


class Heartbeat:
    def __init__(
        self,
        client: redis.Redis,
        worker_id: str,
        role: str,
        queues: list[str],
        interval_s: float,
        lease_s: float,
        load: Callable[[], dict],
        metrics_address: str = "",
        on_beat: Callable[[], None] | None = None,
        serving: Callable[[], bool] = consuming.consuming,
    ):
        self._client = client
        self._interval_s = interval_s
        self._lease_s = lease_s
        self._load = load
        self._on_beat = on_beat  # renews leases that live and die with this one
        # Whether tasks sent to this worker are taken now. While they are not (Celery's consumer
        # reconnecting after a broker outage), the lease is not renewed but dropped: a lease that
        # a restarted Redis got back before the consumer would draw requests nobody reads.
        self._serving = serving
        self._identity: dict[str, Any] = dict(
            worker_id=worker_id, role=role, queues=queues, hostname=socket.gethostname(),
            pid=os.getpid(), started_unix=time.time(), metrics_address=metrics_address,
        )
        self._stop = threading.Event()
        # A beat and stop's drop of the lease never interleave, so a beat that was slow (its
        # load figures wait on the router's index lock, say) cannot renew a lease after stop
        # dropped it: a stopped worker would stay listed, and routed to, for a whole lease.
        self._renewing = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    @property
    def worker_id(self) -> str:
        return self._identity["worker_id"]

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def beat(self) -> None:
        status = WorkerStatus(**self._identity, updated_unix=time.time(), **self._load())
        with self._renewing:
            if self._stop.is_set():
                return
            if not self._serving():
                drop_lease(self._client, self.worker_id)
                return
            renew_lease(self._client, status, self._lease_s)
            if self._on_beat is not None:
                self._on_beat()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._interval_s * 2)
        # Bounded: a beat stuck on a hung Redis must not hold up the worker's shutdown.
        if not self._renewing.acquire(timeout=self._interval_s * 2):
            logger.warning("a heartbeat of %s is stuck; its lease expires on its own", self.worker_id)
            return
        try:
            drop_lease(self._client, self.worker_id)
        except redis.RedisError:
            logger.warning("could not drop lease of %s; it expires on its own", self.worker_id)
        finally:
            self._renewing.release()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.beat()
            except redis.RedisError as e:
                # Redis being away is not fatal here: the lease just lapses until it is back.
                logger.warning("heartbeat failed: %s", e)
