"""The router as a running thing: replays KV events from Redis, watches worker leases, decides.

Every router replica reads the whole KV event stream from its start, so a router that starts late
or restarts builds the same index as one that saw everything live.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass

import redis

from config import Settings
from router.index import RadixIndex
from router.policy import Bookings, Candidate, choose, cost
from tasks import keys
from tasks.messages import KvEvent, decode_kv_event
from tasks.registry import WorkerStatus, live_workers

logger = logging.getLogger(__name__)

# Worker leases are re-read at most this often.
LEASE_CACHE_S = 0.25
# Events applied per XREAD while catching up.
EVENT_BATCH = 5000


class NoCandidates(Exception):
    """No live decode worker to route to."""


@dataclass(frozen=True)
class Decision:
    worker_id: str
    mode: str
    overlap_blocks: int
    prompt_blocks: int


class RouterService:
    def __init__(self, settings: Settings, client: redis.Redis, rng: random.Random | None = None):
        self.settings = settings
        self.config = settings.router
        self.redis = client
        self.index = RadixIndex(settings.engine.block_size)
        self.bookings = Bookings(lag_s=self.config.booking_lag_s)
        self.num_events_applied = 0
        self._rng = rng or random.Random()
        self.lock = threading.Lock()
        self._cursor = "0-0"
        self._workers: dict[str, WorkerStatus] = {}
        self._workers_read_at = 0.0

    # -- KV events -------------------------------------------------------------------------

    def catch_up(self) -> int:
        """Applies every event written so far. Called before each decision and periodically."""
        with self.lock:
            applied = 0
            while True:
                reply = self.redis.xread({keys.KV_EVENTS: self._cursor}, count=EVENT_BATCH)
                if not reply:
                    return applied
                entries = reply[0][1]
                for entry_id, fields in entries:
                    self._cursor = entry_id
                    self._apply(decode_kv_event(fields[b"e"]))
                applied += len(entries)
                self.num_events_applied += len(entries)
                if len(entries) < EVENT_BATCH:
                    return applied

    def _apply(self, event: KvEvent) -> None:
        if event.kind == "stored":
            if event.block_size and event.block_size != self.index.block_size:
                logger.error("worker %s uses block size %d, the router %d: its blocks are not indexed",
                             event.worker_id, event.block_size, self.index.block_size)
                return
            self.index.store(event.worker_id, event.block_hashes, event.parent_hash, event.token_ids)
        elif event.kind == "removed":
            self.index.remove(event.worker_id, event.block_hashes)
        elif event.kind == "cleared":
            self.index.clear(event.worker_id)

    # -- workers ---------------------------------------------------------------------------

    def live_workers(self, fresh: bool = False) -> dict[str, WorkerStatus]:
        now = time.monotonic()
        if fresh or now - self._workers_read_at > LEASE_CACHE_S:
            current = {w.worker_id: w for w in live_workers(self.redis, role="decode")}
            with self.lock:
                for gone in (set(self._workers) | self.index.workers()) - set(current):
                    dropped = self.index.clear(gone)
                    self.bookings.forget(gone)
                    logger.warning("worker %s left (lease expired); dropped its %d blocks", gone, dropped)
                for status in current.values():
                    self.bookings.settle(status.worker_id, status.updated_unix)
                self._workers = current
            self._workers_read_at = now
        return self._workers

    # -- decisions -------------------------------------------------------------------------

    def decide(self, prompt_token_ids: list[int]) -> Decision:
        # An empty cached view is read again before it turns into a 503: it may be from a moment
        # when a worker's lease was between renewals.
        workers = self.live_workers() or self.live_workers(fresh=True)
        if not workers:
            raise NoCandidates("no live decode worker")
        prompt_blocks = self.index.num_prompt_blocks(prompt_token_ids)
        mode = self.config.mode
        if mode == "random":
            return Decision(self._rng.choice(sorted(workers)), mode, 0, prompt_blocks)
        if mode == "round-robin":
            turn = self.redis.incr(keys.ROUTER_ROUND_ROBIN)
            return Decision(sorted(workers)[turn % len(workers)], mode, 0, prompt_blocks)
        self.catch_up()
        with self.lock:
            overlaps = self.index.overlaps(prompt_token_ids)
            candidates = [self._candidate(w, overlaps.get(w.worker_id, 0), prompt_blocks) for w in workers.values()]
            chosen = choose(candidates, self.config.temperature, self._rng)
            self.bookings.book(chosen.worker_id, chosen.prefill_blocks + 1, time.time())
        self._count_hits(chosen.overlap_blocks, prompt_blocks)
        return Decision(chosen.worker_id, mode, chosen.overlap_blocks, prompt_blocks)

    def _candidate(self, status: WorkerStatus, overlap: int, prompt_blocks: int) -> Candidate:
        booked_blocks, booked_requests = self.bookings.pending(status.worker_id)
        prefill = prompt_blocks - overlap
        decode = status.kv_blocks_used + booked_blocks
        return Candidate(status.worker_id, overlap, prefill, decode,
                         status.num_running + status.num_waiting + booked_requests,
                         cost(prefill, decode, self.config.overlap_weight))

    def _count_hits(self, overlap_blocks: int, prompt_blocks: int) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.incrby(keys.ROUTER_OVERLAP_BLOCKS, overlap_blocks)
        pipe.incrby(keys.ROUTER_PROMPT_BLOCKS, prompt_blocks)
        pipe.execute()


def router_hit_rate(client: redis.Redis) -> float:
    overlap, prompt = client.mget(keys.ROUTER_OVERLAP_BLOCKS, keys.ROUTER_PROMPT_BLOCKS)
    return int(overlap or 0) / int(prompt) if prompt and int(prompt) else 0.0
