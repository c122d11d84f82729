"""The router as a running thing: replays KV events from Redis, watches worker leases, decides.

A router that starts late or restarts must build the same index as one that saw everything live.
Every router replica therefore starts from the newest index snapshot in Redis and replays the KV
event stream after it. Replicas save a snapshot every ``router.snapshot_every_events`` events and
trim the stream up to a margin before it, so the stream stays bounded and nothing a new router
needs is lost. A replica that fell further behind than the margin finds the gap (``XINFO
STREAM``'s first entry is past its cursor) and reloads.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field

import redis

from config import Settings
from router.index import RadixIndex
from router.policy import Bookings, Candidate, choose, cost
from tasks import keys
from tasks.messages import (
    KvEvent, KvIndexSnapshot, decode_kv_event, decode_kv_index_snapshot, encode_kv_index_snapshot,
)
from tasks.registry import WorkerStatus, live_workers

logger = logging.getLogger(__name__)

# Worker leases are re-read at most this often.
LEASE_CACHE_S = 0.25
# Events applied per XREAD while catching up.
EVENT_BATCH = 5000


def stream_id(entry_id: str | bytes) -> tuple[int, int]:
    """A Redis Stream entry id as a comparable (ms, seq)."""
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(ms), int(seq or 0)


class NoCandidates(Exception):
    """No live decode worker to route to."""


@dataclass(frozen=True)
class Decision:
    worker_id: str
    mode: str
    overlap_blocks: int
    prompt_blocks: int
    costs: dict[str, float] = field(default_factory=dict)  # kv mode: every candidate's, for the log


class RouterService:
    # The snapshot trim keeps this much of the stream before the snapshot: replicas read the
    # stream at their own pace, and one that is behind by less than this loses nothing. One
    # further behind finds the gap (``check_trimmed``) and reloads from the snapshot.
    trim_margin_s = 60.0

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
        self._events_since_snapshot = 0
        self._read_at = float("-inf")
        self._warned_incomplete = False
        self._workers: dict[str, WorkerStatus] = {}
        self._workers_read_at = 0.0

    # -- KV events -------------------------------------------------------------------------

    def replay(self) -> int:
        """Builds the index from the newest snapshot and the events after it, as a router does
        before it takes any request. Returns how many events it applied."""
        self.load_snapshot()
        return self.catch_up()

    def catch_up(self) -> int:
        """Applies every event written so far. Called before each decision and periodically."""
        if time.monotonic() - self._read_at > self.trim_margin_s / 2:
            # Long enough since the last read that a trim may have passed this router's cursor:
            # reading on would step over the gap without a trace.
            self.check_trimmed()
        self._read_at = time.monotonic()
        with self.lock:
            applied = 0
            while True:
                reply = self.redis.xread({keys.KV_EVENTS: self._cursor}, count=EVENT_BATCH)
                if not reply:
                    return applied
                entries = reply[0][1]
                for _, fields in entries:
                    self._apply(decode_kv_event(fields[b"e"]))
                last_id = entries[-1][0]
                self._cursor = last_id.decode() if isinstance(last_id, bytes) else last_id
                applied += len(entries)
                self.num_events_applied += len(entries)
                self._events_since_snapshot += len(entries)
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

    # -- snapshots -------------------------------------------------------------------------

    def load_snapshot(self) -> bool:
        """Starts the index from the newest snapshot, if there is one this router can use."""
        raw = self.redis.hget(keys.KV_INDEX_SNAPSHOT, "index")
        if raw is None:
            return False
        snapshot = decode_kv_index_snapshot(raw)
        if snapshot.block_size != self.index.block_size:
            logger.error("the index snapshot uses block size %d, this router %d: not loaded",
                         snapshot.block_size, self.index.block_size)
            return False
        with self.lock:
            self.index = RadixIndex.restore(snapshot.block_size, snapshot.nodes, snapshot.held)
            self._cursor = snapshot.cursor
            self._events_since_snapshot = 0
        logger.info("index snapshot loaded: %d blocks as of KV event %s", self.index.num_blocks, snapshot.cursor)
        return True

    def maybe_snapshot(self) -> bool:
        every = self.config.snapshot_every_events
        return bool(every) and self._events_since_snapshot >= every and self.save_snapshot()

    def save_snapshot(self) -> bool:
        """Saves the index and trims the event stream up to it, unless another replica has
        already saved a newer one. Returns whether this one was saved."""
        with self.lock:
            nodes, held = self.index.state()
            snapshot = KvIndexSnapshot(self._cursor, self.index.block_size, nodes, held)
            self._events_since_snapshot = 0
        raw = encode_kv_index_snapshot(snapshot)

        def publish(pipe) -> bool:
            newest = pipe.hget(keys.KV_INDEX_SNAPSHOT, "cursor")
            # An older snapshot must never replace a newer one: the stream is already trimmed
            # past it, so a router loading it would miss the events in between.
            if newest is not None and stream_id(newest) >= stream_id(snapshot.cursor):
                return False
            pipe.multi()
            pipe.hset(keys.KV_INDEX_SNAPSHOT, mapping={"cursor": snapshot.cursor, "index": raw})
            ms, _ = stream_id(snapshot.cursor)
            pipe.xtrim(keys.KV_EVENTS, minid=f"{max(0, ms - int(self.trim_margin_s * 1000))}-0", approximate=False)
            return True

        saved = self.redis.transaction(publish, keys.KV_INDEX_SNAPSHOT, value_from_callable=True)
        if saved:
            logger.info("index snapshot saved: %d blocks as of KV event %s (%d bytes); stream trimmed to %.0fs "
                        "before it", len(nodes), snapshot.cursor, len(raw), self.trim_margin_s)
        return saved

    def check_trimmed(self) -> bool:
        """Reloads from the newest snapshot if the stream was trimmed past events this router
        had not read yet (it fell behind another replica's trim). Returns whether it reloaded."""
        try:
            info = self.redis.xinfo_stream(keys.KV_EVENTS)
        except redis.ResponseError:  # no stream yet: no worker has written an event
            return False
        first = info.get("recorded-first-entry-id") or (info.get("first-entry") or (None,))[0]
        trimmed = info.get("entries-added", 0) > info.get("length", 0)
        if not trimmed or first is None or stream_id(first) <= stream_id(self._cursor):
            return False
        newest = self.redis.hget(keys.KV_INDEX_SNAPSHOT, "cursor")
        # The snapshot trim keeps the entries from a margin before the snapshot on, so a
        # snapshot that covers the gap is at or after the first entry left.
        if newest is not None and stream_id(newest) >= stream_id(first) and self.load_snapshot():
            logger.warning("KV events were trimmed before this router read them; reloaded the index from the "
                           "snapshot")
            return True
        if not self._warned_incomplete:
            # Only the workers' backstop (router.kv_events_maxlen) trims without a snapshot.
            logger.warning("KV events before %s were trimmed with no snapshot covering them; the index misses "
                           "the blocks they stored until those are stored again",
                           first.decode() if isinstance(first, bytes) else first)
            self._warned_incomplete = True
        return False

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
        return Decision(chosen.worker_id, mode, chosen.overlap_blocks, prompt_blocks,
                        {c.worker_id: c.cost for c in candidates})

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
